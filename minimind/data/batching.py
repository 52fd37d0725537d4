"""Batching: which samples go together (length-grouped, seeded per epoch) and how they are padded.
"""
from collections.abc import Sequence

import numpy as np
import torch

from ..model.kernels import IGNORE_INDEX


def collate(items, rows=None, pad_token_id=0):
    """A batch: the items' rows right-padded to the longest, input_ids with pad_token_id, labels
    with IGNORE_INDEX, a 1/0 attention mask.

    `rows` is the stage's collation (training/stages/): items -> (rows {"input_ids", "labels"}, other
    batch fields); by default each item is one row. A DPO pair gives two rows, chosen ones first, so
    that a single forward scores both halves; GRPO prompts carry their records along ("records").
    """
    batch, extra = rows(items) if rows else (items, {})
    length = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item["input_ids"])
        input_ids[row, :size] = item["input_ids"]
        labels[row, :size] = item["labels"]
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **extra}


def batch_indices(lengths, batch_size, seed, epoch, shuffle=True, group_by_length=True, drop_last=False,
                  num_samples=None):
    """The batches of one epoch (`Batches`: each a list of sample indices); the same arguments give
    the same batches.

    Length grouping: shuffle, sort each mega-chunk of 50 batches by length so a batch holds
    samples of similar length (little padding), then shuffle the batch order so the model does
    not see all short samples first. lengths may be None without grouping (give num_samples).
    """
    count = len(lengths) if lengths is not None else num_samples
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count) if shuffle else np.arange(count)
    if group_by_length:
        lengths = np.asarray(lengths)
        chunk = 50 * batch_size
        order = np.concatenate([
            part[np.argsort(-lengths[part], kind="stable")]
            for part in np.split(order, range(chunk, count, chunk))]) if count else order
    starts = np.arange(0, count - batch_size + 1 if drop_last else count, batch_size, dtype=np.int64)
    if shuffle:
        starts = starts[rng.permutation(len(starts))]
    return Batches(order, starts, batch_size)


class Batches(Sequence):
    """An epoch's batches in run order, kept as the samples' order and each batch's start in it:
    16 bytes a sample at most, however many millions of samples an epoch has (as lists of Python
    ints they took ~44). A batch is made into a list of ints when it is read; a slice is a Batches."""

    def __init__(self, order, starts, batch_size):
        self.order, self.starts, self.batch_size = order, starts, batch_size

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Batches(self.order, self.starts[i], self.batch_size)
        start = int(self.starts[i])
        return self.order[start:start + self.batch_size].tolist()

    def __eq__(self, other):
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))


def padding_waste(batches, lengths):
    """Fraction of positions in the padded batches that are padding."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded if padded else 0.0
