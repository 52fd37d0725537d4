"""Evaluation: how well a trained model predicts held-out data.

    minimind eval --model output/final --data data/pretrain_eval.jsonl   (perplexity)
    minimind eval --model output/final --data data/sft_eval.jsonl        (exact match + answer loss)
    minimind eval --model output/dpo/final --data data/dpo_eval.jsonl    (preferences + greedy answers)
    minimind eval --model output/grpo/final --data data/grpo_eval.jsonl  (exact match on prompts)

What is measured belongs to the stage that the file's records imply (training/stages/, the stage's
`evaluate` and `report_rows`): perplexity on text (pretrain.py), exact match and answer loss on
conversations (sft.py), preferences and greedy answers on pairs (dpo.py), exact match on GRPO
prompts (grpo.py). This module runs the model for them (`Evaluator`): losses and log-probabilities
through the model's forward, exactly as training computes them, and greedy answers.

A JSON report with every answer is written beside the model (--report).
"""
import itertools

import torch

from ..data.batching import collate
from ..data.conversations import encode_chat, encode_conversations
from ..data.datasets import PretrainDataset
from ..data.records import SkippedRecords, detect_format, read_records
from ..training.stages import STAGES, stage_for
from ..training.stages.stage import count_labelled_tokens
from .decoding import generate, model_device
from .prepared import prepare

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


def greedy_answers(model, tokenizer, prompts_messages, references, max_seq_len, batch_size=8, progress=None):
    """The model's greedy answer to each prompt (a list of messages), in batches of similar prompt
    length, each allowed its reference's length + a margin and stopping at <|im_end|>. model: a
    MiniMindForCausalLM or what decodes it (a PreparedModel, a LlamaCppModel)."""
    decoder = prepare(model)  # once for all the batches
    prompts = [encode_chat(tokenizer, messages) for messages in prompts_messages]
    reference_lengths = [len(tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references]
    answers = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        budget = max(reference_lengths[i] for i in rows) + ANSWER_MARGIN_TOKENS
        room = max_seq_len - budget
        out = generate(decoder, [prompts[i][-room:] if room > 0 else prompts[i] for i in rows],
                       max_new_tokens=budget, temperature=0.0, tokenizer=tokenizer,
                       eos_token_id=tokenizer.eos_token_id)
        for row, index in enumerate(rows):
            answers[index] = out.texts[row]
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return answers


class Evaluator:
    """Runs the model for a stage's evaluation (the stage's `evaluate(evaluator, path)` says what to
    measure): the file's records, teacher-forced losses and log-probabilities, greedy answers."""

    def __init__(self, model, tokenizer, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, max_samples=None,
                 skip_bad_records=False, progress=None, decoder=None):
        self.model, self.tokenizer, self.max_seq_len, self.batch_size = model, tokenizer, max_seq_len, batch_size
        self.decoder = model if decoder is None else decoder  # what writes the greedy answers
        self.max_samples, self.skip_bad_records, self.progress = max_samples, skip_bad_records, progress
        self.skipped = SkippedRecords()

    def records(self, path):
        """The file's normalized records: the first --max_samples, read no further (a sample of a
        gigabyte training file costs its first lines only)."""
        records = (record for _, record in read_records(path, self.skip_bad_records, self.skipped))
        return list(itertools.islice(records, self.max_samples or None))

    def text_loss(self, path):
        """(windows, summed loss, predicted tokens) on the windows that training cuts from the same
        file (data.PretrainDataset): the same numbers as train.py's validation with --eval_data FILE."""
        dataset = PretrainDataset([path], self.tokenizer, self.max_seq_len, skip_bad_records=self.skip_bad_records)
        windows = [dataset[i] for i in range(min(len(dataset), self.max_samples or len(dataset)))]
        return (len(windows), *summed_loss(self.model, windows, self.batch_size))

    def answer_loss(self, conversations):
        """(summed loss, labelled tokens) on the assistant tokens of conversations, as SFT trains."""
        items = as_items(encode_conversations(self.tokenizer, conversations), self.max_seq_len)
        return summed_loss(self.model, items, self.batch_size)

    def response_log_probs(self, prompts, responses):
        """Each response's summed log-probability after its prompt (both lists of messages)."""
        conversations = [prompt + response for prompt, response in zip(prompts, responses)]
        encoded = encode_conversations(self.tokenizer, conversations, train_from=[len(prompt) for prompt in prompts])
        return response_log_probs(self.model, as_items(encoded, self.max_seq_len), self.batch_size)

    def greedy_answers(self, prompts, references):
        """The model's greedy answer to each prompt (a list of messages), each allowed its reference's
        length + a margin."""
        return greedy_answers(self.decoder, self.tokenizer, prompts, references, self.max_seq_len, self.batch_size,
                              self.progress)


def evaluate(model, tokenizer, data_path, max_seq_len=DEFAULT_MAX_SEQ_LEN, batch_size=8, max_samples=None,
             skip_bad_records=False, progress=None, decoder=None):
    """Evaluate on one data file, as the stage its records imply does; returns the report dict.
    decoder: what writes the greedy answers (prepared.prepare's, or a LlamaCppModel) [the model's own
    torch decoder]; losses and log-probabilities are always the model's forward."""
    stage = stage_for(detect_format([data_path]))
    model.eval()
    evaluator = Evaluator(model, tokenizer, max_seq_len, batch_size, max_samples, skip_bad_records, progress, decoder)
    report = {"stage": stage.name, **stage.evaluate(evaluator, data_path)}
    if evaluator.skipped:
        report["skipped"] = evaluator.skipped.describe()
    return {"data": str(data_path), "max_seq_len": max_seq_len, **report}


def format_table(report):
    rows = STAGES[report["stage"]].report_rows(report)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
