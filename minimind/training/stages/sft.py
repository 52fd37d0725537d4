"""Supervised fine-tuning: conversations, trained on the assistant's tokens only.

Records: {"conversations": [...]} (MiniMind) or {"messages": [...]} (OpenAI style), with tools when
given (data/records.py CONVERSATIONS). Each is rendered with the chat template; the labels are the
assistant's tokens (content and closing <|im_end|>), the rest is context (data/conversations.py).
Loss: the mean next-token cross-entropy over the labelled tokens; validation reports it with its
perplexity. The sample at the end of a run answers the prompt of a validation conversation.

--replay_data mixes pretraining text into the conversations (trainer.py, `with_replay`): its
windows of --max_seq_len tokens join the samples of every epoch and are trained on every token, as
in pretraining, so that fine-tuning does not overwrite what pretraining stored (catastrophic
forgetting; docs/training_guide.md, "Replaying pretraining text").
"""
import math

from ...data.records import CONVERSATIONS
from ..rewards import is_exact_match
from .stage import Stage, language_model_loss, skill_rows, with_skills


def answer_questions(conversations):
    """(conversation index, prompt messages, reference answer) for every assistant turn."""
    for index, messages in enumerate(conversations):
        for turn, message in enumerate(messages):
            if message["role"] == "assistant" and turn > 0:
                yield index, messages[:turn], message["content"]


def evaluate(evaluator, path):
    """`minimind eval` on conversations: every assistant turn is a question. Its prompt is the
    conversation before it, rendered through the chat template with the assistant header; the model
    answers greedily (up to the reference's length + a margin, stopping at <|im_end|>) and scores an
    exact match when its answer equals the reference after stripping surrounding whitespace. The
    answer loss is the mean cross-entropy on the assistant tokens, exactly the loss SFT trains."""
    conversation_records = evaluator.records(path)
    conversations = [record["messages"] for record in conversation_records]
    total, count = evaluator.answer_loss(conversations)  # teacher-forced, on the assistant tokens only

    questions = list(answer_questions(conversations))
    answers = evaluator.greedy_answers([messages for _, messages, _ in questions],
                                       [reference for _, _, reference in questions])
    records = [{"conversation": conversation, "question": messages[-1]["content"], "reference": reference,
                "answer": answer, "match": is_exact_match(answer, reference)}
               for (conversation, messages, reference), answer in zip(questions, answers)]
    for record in records:
        if "skill" in conversation_records[record["conversation"]]:
            record["skill"] = conversation_records[record["conversation"]]["skill"]
    matches = sum(record["match"] for record in records)
    loss = total / count if count else float("nan")
    return with_skills({"conversations": len(conversations), "answers": len(records),
            "exact_match": matches / len(records) if records else float("nan"), "answer_loss": loss,
            "answer_perplexity": math.exp(loss) if count else float("nan"), "answer_tokens": count,
            "details": records})


def report_rows(report):
    return [("exact match", f"{report['exact_match']:.1%} ({sum(r['match'] for r in report['details'])}"
                            f"/{report['answers']})"),
            ("answer loss", f"{report['answer_loss']:.4f}"),
            ("answer perplexity", f"{report['answer_perplexity']:.3f}"),
            ("answer tokens", report["answer_tokens"]), ("conversations", report["conversations"])] + skill_rows(report)


STAGE = Stage("sft", "SFT", reads=(CONVERSATIONS,), loss=language_model_loss, perplexity=True,
              evaluate=evaluate, report_rows=report_rows)
