"""Evaluation: how well a trained model predicts held-out data.

    minimind eval --model output/final --data data/pretrain_eval.jsonl   (perplexity)
    minimind eval --model output/final --data data/sft_eval.jsonl        (exact match + answer loss)
    minimind eval --model output/dpo/final --data data/dpo_eval.jsonl    (preferences + greedy answers)

Pretraining data ({"text": ...}): documents are tokenized and joined by <|endoftext|> as in
training, cut into windows of --max_seq_len tokens; loss is the mean next-token cross-entropy
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

A JSON report with every answer is written beside the model (--report).
"""
import argparse
import difflib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .generation import add_model_arguments, encode_chat, generate, model_from_args

ANSWER_MARGIN_TOKENS = 16   # generated beyond the reference length, so a longer answer shows as wrong
DEFAULT_MAX_SEQ_LEN = 512


@torch.inference_mode()
def sequence_losses(model, sequences, labels=None, batch_size=8):
    """Per sequence, the sum of its next-token cross-entropies and the number of predicted tokens.

    labels: id lists with -100 where no prediction counts (default: every token counts).
    Sequences are right-padded in batches; padding is masked out of attention and of the loss.
    """
    labels = labels or sequences
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = max(len(sequences[i]) for i in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for row, index in enumerate(rows):
            n = len(sequences[index])
            ids[row, :n] = torch.tensor(sequences[index])
            targets[row, :n] = torch.tensor(labels[index])
            mask[row, :n] = 1
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), targets[:, 1:], ignore_index=-100, reduction="none")
        for row, index in enumerate(rows):
            sums[index] = losses[row].sum().item()
            counts[index] = int((targets[row, 1:] != -100).sum())
    return sums, counts


def summed_token_loss(model, sequences, labels=None, batch_size=8):
    """Sum of next-token cross-entropies and the number of predicted tokens, over id lists."""
    sums, counts = sequence_losses(model, sequences, labels, batch_size)
    return sum(sums), sum(counts)


def pretrain_windows(tokenizer, texts, max_seq_len):
    """Documents joined by <|endoftext|> (as PretrainDataset does), cut into windows of max_seq_len;
    a last window shorter than 2 tokens (nothing to predict) is dropped."""
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids + [separator])
    windows = [stream[i:i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    return [window for window in windows if len(window) >= 2]


def evaluate_pretrain(model, tokenizer, texts, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8):
    windows = pretrain_windows(tokenizer, texts, max_seq_len)
    total, count = summed_token_loss(model, windows, batch_size=batch_size)
    loss = total / count
    return {"stage": "pretrain", "documents": len(texts), "windows": len(windows), "tokens": count,
            "loss": loss, "perplexity": math.exp(loss)}


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


def evaluate_sft(model, tokenizer, conversations, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, progress=None):
    from .data import encode_conversations

    # Answer loss: teacher-forced, on the assistant tokens only, as in SFT training.
    encoded = encode_conversations(tokenizer, conversations)
    sequences = [ids[:max_seq_len] for ids, _ in encoded]
    labels = [lab[:max_seq_len] for _, lab in encoded]
    kept = [i for i, lab in enumerate(labels) if any(label != -100 for label in lab[1:])]
    total, count = summed_token_loss(model, [sequences[i] for i in kept], [labels[i] for i in kept], batch_size)

    questions = list(answer_questions(conversations))
    answers = greedy_answers(model, tokenizer, [messages for _, messages, _ in questions],
                             [reference for _, _, reference in questions], max_seq_len, batch_size, progress)
    records = [{"conversation": conversation, "question": messages[-1]["content"], "reference": reference,
                "answer": answer, "match": answer.strip() == reference.strip()}
               for (conversation, messages, reference), answer in zip(questions, answers)]
    matches = sum(record["match"] for record in records)
    loss = total / count if count else float("nan")
    return {"stage": "sft", "conversations": len(conversations), "answers": len(records),
            "exact_match": matches / len(records) if records else float("nan"), "answer_loss": loss,
            "answer_perplexity": math.exp(loss) if count else float("nan"), "answer_tokens": count,
            "details": records}


def similarity(a, b):
    """Character-level similarity in [0, 1]: 2 * matched characters / total characters (difflib)."""
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def evaluate_preferences(model, tokenizer, pairs, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, progress=None):
    from .data import encode_conversations

    # Which answer the model finds more likely: summed log-probabilities of the response tokens.
    def response_log_probs(side):
        encoded = encode_conversations(tokenizer, [pair["prompt_messages"] + pair[side] for pair in pairs])
        sums, _ = sequence_losses(model, [ids[:max_seq_len] for ids, _ in encoded],
                                  [labels[:max_seq_len] for _, labels in encoded], batch_size)
        return [-total for total in sums]
    chosen_log_probs, rejected_log_probs = response_log_probs("chosen"), response_log_probs("rejected")

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
    from .data import detect_stage, read_records

    stage = detect_stage([data_path])
    records = [record for _, record in read_records(data_path, skip_bad_records=skip_bad_records, stats={})]
    records = records[:max_samples] if max_samples else records
    model.eval()
    if stage == "pretrain":
        report = evaluate_pretrain(model, tokenizer, [r["text"] for r in records], max_seq_len, batch_size)
    elif stage == "sft":
        report = evaluate_sft(model, tokenizer, [r["messages"] for r in records], max_seq_len, batch_size, progress)
    else:
        report = evaluate_preferences(model, tokenizer, records, max_seq_len, batch_size, progress)
    return {"data": str(data_path), "max_seq_len": max_seq_len, **report}


def format_table(report):
    if report["stage"] == "pretrain":
        rows = [("perplexity", f"{report['perplexity']:.3f}"), ("loss", f"{report['loss']:.4f}"),
                ("tokens", report["tokens"]), ("documents", report["documents"])]
    elif report["stage"] == "dpo":
        rows = [("prefers chosen", f"{report['preference_accuracy']:.1%} (log-probability, {report['pairs']} pairs)"),
                ("log-prob margin", f"{report['log_prob_margin']:.3f}"),
                ("greedy closer to", f"chosen {report['greedy_closer_to_chosen']:.1%}, "
                                     f"rejected {report['greedy_closer_to_rejected']:.1%}"),
                ("greedy equals", f"chosen {report['greedy_equals_chosen']:.1%}, "
                                  f"rejected {report['greedy_equals_rejected']:.1%}"),
                ("mean similarity", f"chosen {report['similarity_chosen']:.3f}, "
                                    f"rejected {report['similarity_rejected']:.3f}")]
    else:
        rows = [("exact match", f"{report['exact_match']:.1%} ({sum(r['match'] for r in report['details'])}"
                                f"/{report['answers']})"),
                ("answer loss", f"{report['answer_loss']:.4f}"),
                ("answer perplexity", f"{report['answer_perplexity']:.3f}"),
                ("answer tokens", report["answer_tokens"]), ("conversations", report["conversations"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def default_report_path(model_arg):
    path = Path(model_arg)
    return (path if path.is_dir() else path.parent) / "eval_report.json"


def main(argv):
    parser = argparse.ArgumentParser(prog="minimind eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a pretraining, SFT or preference (DPO) data file (.jsonl, .json, .txt, .parquet)")
    parser.add_argument("--report", default=None, help="JSON report path (default: eval_report.json beside the model)")
    parser.add_argument("--max_seq_len", type=int, default=DEFAULT_MAX_SEQ_LEN, help="evaluation window in tokens")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--skip_bad_records", action="store_true")
    args = parser.parse_args(argv)
    if args.max_seq_len < 2:
        raise UserError("--max_seq_len must be at least 2")
    model, tokenizer = model_from_args(args)

    shown_decile = 0

    def progress(done, total):
        nonlocal shown_decile
        if sys.stderr.isatty():  # one line, rewritten in place
            print(f"\ranswering {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done * 10 // total > shown_decile:  # a log file: a line every 10%
            shown_decile = done * 10 // total
            print(f"answering {done}/{total}", file=sys.stderr, flush=True)

    report = evaluate(model, tokenizer, args.data, min(args.max_seq_len, model.config.max_position_embeddings),
                      args.batch_size, args.max_samples, args.skip_bad_records, progress)
    report["model"] = args.model
    report_path = Path(args.report) if args.report else default_report_path(args.model)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(format_table(report))
    print(f"report: {report_path}")
    return 0
