"""A dense reward for GRPO on the bundled prompts (data/grpo_train.jsonl), beside exact_match.

exact_match pays only a whole right answer, so a group of answers that are all slightly wrong
("8 + 9 = 16." for "Add 9 and 9.") teaches nothing. prefix_match pays the share of the reference
that the answer gets right from its start, so copying the question's numbers or name already
earns part of the reward, and answers within a group differ in reward far more often.

    python train.py --stage grpo ... --reward exact_match=1 data/grpo_rewards.py:prefix_match=0.5
"""
import os


def prefix_match(prompt, answer, record):
    """len(common prefix of answer and reference) / len(reference), in [0, 1]; whitespace around both ignored."""
    reference = record["answer"].strip()
    return len(os.path.commonprefix([answer.strip(), reference])) / max(len(reference), 1)
