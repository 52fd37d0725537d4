"""Evaluation: how well a trained model predicts held-out data.

    minimind eval --model output/final --data data/pretrain_eval.jsonl   (perplexity)
    minimind eval --model output/final --data data/sft_eval.jsonl        (exact match + answer loss)
    minimind eval --model output/dpo/final --data data/dpo_eval.jsonl    (preferences + greedy answers)
    minimind eval --model output/grpo/final --data data/grpo_eval.jsonl  (exact match on prompts)

Pretraining data ({"text": ...}): the windows of --max_seq_len tokens that training cuts from the same
file (documents joined by <|endoftext|>, the last partial window left out), so this perplexity is
train.py's validation perplexity with --eval_data FILE; loss is the mean next-token cross-entropy
over every predicted token (the first token of each window has no prediction), and
perplexity = exp(loss): the number of equally likely tokens the model is, on average, choosing among.

SFT data ({"messages": ...}): every assistant turn is a question. Its prompt is the conversation
before it, rendered through the chat template with the assistant header; the model answers
greedily (up to the reference's length + a margin, stopping at <|im_end|>) and scores an exact
match when its answer equals the reference after stripping surrounding whitespace. The answer
loss is the mean cross-entropy on the assistant tokens (content and closing <|im_end|>), exactly
the loss SFT trains.

Preference data ({"chosen": ..., "rejected": ...}): the share of pairs whose chosen response has the
higher summed log-probability under the model (no reference model: this is the model's own
preference, not DPO's reward accuracy), and the model's greedy answer to each prompt compared with
both responses: exact matches, and character similarity (difflib's ratio), counting the pairs where
the answer is closer to the chosen response and those where it is closer to the rejected one.

GRPO prompts ({"prompt": ..., "answer": ...}): the model's greedy answer to each prompt, as for SFT
data, and its exact match against the record's reference answer: the `exact_match` reward that
GRPO trains with (rewards.py). Records that carry a "pattern" also get the share of answers in
that format (the `answer_pattern` reward).

Conversations and prompts that carry a "skill" label (as the bundled held-out questions do) also get
their exact match per skill: the report's by_skill, and one line per skill in the table.

A JSON report with every answer is written beside the model (--report).
"""
import difflib
import math

import torch

from ..data.batching import collate
from ..data.conversations import encode_chat, encode_conversations
from ..data.datasets import PretrainDataset
from ..data.records import SkippedRecords, detect_stage, read_records
from ..training.rewards import answer_pattern, is_exact_match
from ..training.stages import count_labelled_tokens
from .decoding import generate, model_device

ANSWER_MARGIN_TOKENS = 16   # generated beyond the reference length, so a longer answer shows as wrong
DEFAULT_MAX_SEQ_LEN = 512


def batches_by_length(items, batch_size):
    """(indices, collated batch) over dataset items ({"input_ids", "labels"} tensors), in batches of
    similar length (little padding), right-padded as in training."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, collate([items[i] for i in rows])


@torch.inference_mode()
def summed_loss(model, items, batch_size=8):
    """The summed next-token cross-entropy over the labelled tokens of `items`, and their number:
    the model's forward with labels, the loss training minimises and validates with."""
    device = model_device(model)
    total, count = 0.0, 0
    for _, batch in batches_by_length(items, batch_size):
        out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device), num_items_in_batch=1,
                    return_logits=False)
        total += out.loss.item()
        count += count_labelled_tokens(batch)
    return total, count


@torch.inference_mode()
def response_log_probs(model, items, batch_size=8):
    """Each item's summed log-probability of its labelled tokens (model.sequence_log_probs, as DPO)."""
    device = model_device(model)
    log_probs = [0.0] * len(items)
    for rows, batch in batches_by_length(items, batch_size):
        sums, _ = model.sequence_log_probs(batch["input_ids"].to(device), batch["labels"].to(device))
        for row, index in enumerate(rows):
            log_probs[index] = sums[row].item()
    return log_probs


def as_items(encoded, max_seq_len):
    """(ids, labels) lists -> dataset items cut to max_seq_len, as SFTDataset and DPODataset cut them."""
    return [{"input_ids": torch.tensor(ids[:max_seq_len]), "labels": torch.tensor(labels[:max_seq_len])}
            for ids, labels in encoded]


def evaluate_pretrain(model, tokenizer, path, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, max_samples=None,
                      skip_bad_records=False):
    """Perplexity on the windows that training cuts from the same file (data.PretrainDataset)."""
    dataset = PretrainDataset([path], tokenizer, max_seq_len, skip_bad_records=skip_bad_records)
    windows = [dataset[i] for i in range(min(len(dataset), max_samples or len(dataset)))]
    total, count = summed_loss(model, windows, batch_size)
    loss = total / count
    return {"stage": "pretrain", "windows": len(windows), "tokens": count, "loss": loss,
            "perplexity": math.exp(min(loss, 50))}


def answer_questions(conversations):
    """(conversation index, prompt messages, reference answer) for every assistant turn."""
    for index, messages in enumerate(conversations):
        for turn, message in enumerate(messages):
            if message["role"] == "assistant" and turn > 0:
                yield index, messages[:turn], message["content"]


def greedy_answers(model, tokenizer, prompts_messages, references, max_seq_len, batch_size=8, progress=None):
    """The model's greedy answer to each prompt (a list of messages), in batches of similar prompt
    length, each allowed its reference's length + a margin and stopping at <|im_end|>."""
    prompts = [encode_chat(tokenizer, messages) for messages in prompts_messages]
    reference_lengths = [len(tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references]
    answers = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        budget = max(reference_lengths[i] for i in rows) + ANSWER_MARGIN_TOKENS
        room = max_seq_len - budget
        out = generate(model, [prompts[i][-room:] if room > 0 else prompts[i] for i in rows],
                       max_new_tokens=budget, temperature=0.0, tokenizer=tokenizer,
                       eos_token_id=tokenizer.eos_token_id)
        for row, index in enumerate(rows):
            answers[index] = out.texts[row]
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return answers


def by_skill(details):
    """Exact match per "skill" label of the records (in the order skills first appear), or None when
    no record has one."""
    groups = {}
    for detail in details:
        if "skill" in detail:
            group = groups.setdefault(detail["skill"], {"correct": 0, "total": 0})
            group["correct"] += detail["match"]
            group["total"] += 1
    for group in groups.values():
        group["exact_match"] = group["correct"] / group["total"]
    return groups or None


def evaluate_sft(model, tokenizer, conversations, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, progress=None,
                 skills=None):
    """skills: each conversation's "skill" label or None, for the report's by_skill."""
    # Answer loss: teacher-forced, on the assistant tokens only, as in SFT training.
    total, count = summed_loss(model, as_items(encode_conversations(tokenizer, conversations), max_seq_len), batch_size)

    questions = list(answer_questions(conversations))
    answers = greedy_answers(model, tokenizer, [messages for _, messages, _ in questions],
                             [reference for _, _, reference in questions], max_seq_len, batch_size, progress)
    records = [{"conversation": conversation, "question": messages[-1]["content"], "reference": reference,
                "answer": answer, "match": is_exact_match(answer, reference)}
               for (conversation, messages, reference), answer in zip(questions, answers)]
    for record in records:
        if skills and skills[record["conversation"]] is not None:
            record["skill"] = skills[record["conversation"]]
    matches = sum(record["match"] for record in records)
    loss = total / count if count else float("nan")
    report = {"stage": "sft", "conversations": len(conversations), "answers": len(records),
              "exact_match": matches / len(records) if records else float("nan"), "answer_loss": loss,
              "answer_perplexity": math.exp(loss) if count else float("nan"), "answer_tokens": count}
    return with_skills(report, records)


def with_skills(report, details):
    """The report with its per-skill exact match (when the records carry skills) and its details."""
    skills = by_skill(details)
    return {**report, **({"by_skill": skills} if skills else {}), "details": details}


def evaluate_prompts(model, tokenizer, records, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, progress=None):
    """Greedy answers to GRPO prompts, scored by exact match (and the answer pattern when every
    record has one): the held-out measure of what GRPO trains."""
    answers = greedy_answers(model, tokenizer, [record["prompt_messages"] for record in records],
                             [record["answer"] for record in records], max_seq_len, batch_size, progress)
    with_pattern = all("pattern" in record["fields"] for record in records)
    details = []
    for record, answer in zip(records, answers):
        details.append({"question": record["prompt_messages"][-1]["content"], "reference": record["answer"],
                        "answer": answer, "match": is_exact_match(answer, record["answer"])})
        if isinstance(record["fields"].get("skill"), str):
            details[-1]["skill"] = record["fields"]["skill"]
        if with_pattern:
            details[-1]["pattern_match"] = answer_pattern(details[-1]["question"], answer, record["fields"]) == 1.0
    n = len(details)
    report = {"stage": "grpo", "prompts": n,
              "exact_match": sum(d["match"] for d in details) / n if n else float("nan")}
    if with_pattern:
        report["pattern_match"] = sum(d["pattern_match"] for d in details) / n if n else float("nan")
    return with_skills(report, details)


def similarity(a, b):
    """Character-level similarity in [0, 1]: 2 * matched characters / total characters (difflib)."""
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def evaluate_preferences(model, tokenizer, pairs, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, progress=None):
    # Which answer the model finds more likely: summed log-probabilities of the response tokens.
    def side_log_probs(side):
        prompts = [pair["prompt_messages"] for pair in pairs]
        encoded = encode_conversations(tokenizer, [prompt + pair[side] for prompt, pair in zip(prompts, pairs)],
                                       train_from=[len(prompt) for prompt in prompts])
        return response_log_probs(model, as_items(encoded, max_seq_len), batch_size)
    chosen_log_probs, rejected_log_probs = side_log_probs("chosen"), side_log_probs("rejected")

    # Which answer the model's own greedy answer resembles.
    chosen_texts = [pair["chosen"][0]["content"] for pair in pairs]
    rejected_texts = [pair["rejected"][0]["content"] for pair in pairs]
    answers = greedy_answers(model, tokenizer, [pair["prompt_messages"] for pair in pairs],
                             [max(c, r, key=len) for c, r in zip(chosen_texts, rejected_texts)],
                             max_seq_len, batch_size, progress)
    records = []
    for index, answer in enumerate(answers):
        records.append({"pair": index, "question": pairs[index]["prompt_messages"][-1]["content"],
                        "chosen": chosen_texts[index], "rejected": rejected_texts[index], "answer": answer,
                        "log_prob_chosen": chosen_log_probs[index], "log_prob_rejected": rejected_log_probs[index],
                        "similarity_chosen": similarity(answer, chosen_texts[index]),
                        "similarity_rejected": similarity(answer, rejected_texts[index])})
    n = len(records)

    def share(condition):
        return sum(1 for record in records if condition(record)) / n if n else float("nan")

    def mean(key):
        return sum(record[key] for record in records) / n if n else float("nan")
    return {"stage": "dpo", "pairs": n,
            "preference_accuracy": share(lambda r: r["log_prob_chosen"] > r["log_prob_rejected"]),
            "log_prob_margin": mean("log_prob_chosen") - mean("log_prob_rejected"),
            "greedy_closer_to_chosen": share(lambda r: r["similarity_chosen"] > r["similarity_rejected"]),
            "greedy_closer_to_rejected": share(lambda r: r["similarity_rejected"] > r["similarity_chosen"]),
            "greedy_equals_chosen": share(lambda r: r["answer"].strip() == r["chosen"].strip()),
            "greedy_equals_rejected": share(lambda r: r["answer"].strip() == r["rejected"].strip()),
            "similarity_chosen": mean("similarity_chosen"), "similarity_rejected": mean("similarity_rejected"),
            "details": records}


def evaluate(model, tokenizer, data_path, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, max_samples=None,
             skip_bad_records=False, progress=None):
    """Evaluate on one data file; returns the report dict (see the module docstring)."""
    stage = detect_stage([data_path])
    model.eval()
    skipped = SkippedRecords()
    if stage == "pretrain":
        report = evaluate_pretrain(model, tokenizer, data_path, max_seq_len, batch_size, max_samples, skip_bad_records)
    else:
        records = [record for _, record in read_records(data_path, skip_bad_records, skipped)]
        records = records[:max_samples] if max_samples else records
        if stage == "sft":
            report = evaluate_sft(model, tokenizer, [r["messages"] for r in records], max_seq_len, batch_size, progress,
                                  [r.get("skill") for r in records])
        elif stage == "grpo":
            report = evaluate_prompts(model, tokenizer, records, max_seq_len, batch_size, progress)
        else:
            report = evaluate_preferences(model, tokenizer, records, max_seq_len, batch_size, progress)
    if skipped:
        report["skipped"] = skipped.describe()
    return {"data": str(data_path), "max_seq_len": max_seq_len, **report}


def format_table(report):
    if report["stage"] == "pretrain":
        rows = [("perplexity", f"{report['perplexity']:.3f}"), ("loss", f"{report['loss']:.4f}"),
                ("tokens", report["tokens"]), ("windows", report["windows"])]
    elif report["stage"] == "dpo":
        rows = [("prefers chosen", f"{report['preference_accuracy']:.1%} (log-probability, {report['pairs']} pairs)"),
                ("log-prob margin", f"{report['log_prob_margin']:.3f}"),
                ("greedy closer to", f"chosen {report['greedy_closer_to_chosen']:.1%}, "
                                     f"rejected {report['greedy_closer_to_rejected']:.1%}"),
                ("greedy equals", f"chosen {report['greedy_equals_chosen']:.1%}, "
                                  f"rejected {report['greedy_equals_rejected']:.1%}"),
                ("mean similarity", f"chosen {report['similarity_chosen']:.3f}, "
                                    f"rejected {report['similarity_rejected']:.3f}")]
    elif report["stage"] == "grpo":
        rows = [("exact match", f"{report['exact_match']:.1%} ({sum(r['match'] for r in report['details'])}"
                                f"/{report['prompts']})")]
        if "pattern_match" in report:
            rows.append(("answer pattern", f"{report['pattern_match']:.1%}"))
    else:
        rows = [("exact match", f"{report['exact_match']:.1%} ({sum(r['match'] for r in report['details'])}"
                                f"/{report['answers']})"),
                ("answer loss", f"{report['answer_loss']:.4f}"),
                ("answer perplexity", f"{report['answer_perplexity']:.3f}"),
                ("answer tokens", report["answer_tokens"]), ("conversations", report["conversations"])]
    for skill, group in (report.get("by_skill") or {}).items():
        rows.append((f"  {skill}", f"{group['exact_match']:.1%} ({group['correct']}/{group['total']})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
