"""Pretraining: next-token prediction on plain text, every token labelled.

Records: {"text": ...} lines, or .txt files (data/records.py TEXT). The documents, joined by
<|endoftext|>, are cut into windows of --max_seq_len tokens (data/datasets.py PretrainDataset).
Loss: the mean next-token cross-entropy over every predicted token; validation reports it with its
perplexity. The sample at the end of a run continues the first tokens of a validation window.
"""
import math

from ...data.records import TEXT
from .stage import Stage, language_model_loss


def evaluate(evaluator, path):
    """`minimind eval` on text: perplexity on the windows that training cuts from the same file
    (documents joined by <|endoftext|>, the last partial window left out), so this is train.py's
    validation perplexity with --eval_data FILE. loss is the mean next-token cross-entropy over every
    predicted token (the first token of each window has no prediction), and perplexity = exp(loss):
    the number of equally likely tokens the model is, on average, choosing among."""
    windows, total, count = evaluator.text_loss(path)
    loss = total / count
    return {"windows": windows, "tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 50))}


def report_rows(report):
    return [("perplexity", f"{report['perplexity']:.3f}"), ("loss", f"{report['loss']:.4f}"),
            ("tokens", report["tokens"]), ("windows", report["windows"])]


STAGE = Stage("pretrain", "pretraining", reads=(TEXT,), loss=language_model_loss, perplexity=True,
              evaluate=evaluate, report_rows=report_rows)
