"""The run's schedule: how many optimizer steps it takes (`Plan`), which samples each step trains
on (`epoch_steps`, a deterministic function of the seed and the epoch, so that a resume sees the
same order), how a step is cut into micro-batches, what follows each step (`due_after`: a log
line, a validation, a checkpoint, the end of an epoch and its model file), which samples validation
uses, and the learning rate at each step. The trainer does what it says and the forecast
(estimate.py, dry_run.py) counts it, so the two cannot disagree.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import batch_indices


@dataclass
class Plan:
    """How many optimizer steps the run takes: --epochs passes, or exactly --max_steps. A step takes
    the global batch: --batch_size per rank x ranks x --accumulation_steps samples."""
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def make(cls, num_samples, optim, world_size=1):
        global_batch = optim.batch_size * world_size * optim.accumulation_steps
        steps_per_epoch = math.ceil(num_samples / global_batch)
        total = optim.max_steps or steps_per_epoch * optim.epochs
        return cls(global_batch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))

    def steps_in_epoch(self, epoch):
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


@dataclass(frozen=True)
class Due:
    """What follows one optimizer step, in this order (Trainer.after_step, then Trainer.end_epoch)."""
    log: bool            # a log line and a metrics row: the epoch's grid of --log_interval steps, and its last step
    validate: bool       # a validation at --eval_interval (not after the run's last step: the epoch's end validates)
    checkpoint: bool     # checkpoint.pt at --save_steps
    epoch_end: bool      # the epoch's last step (or --max_steps'): a validation, then checkpoint.pt
    epoch_complete: bool  # ... of an epoch run in full (not cut short by --max_steps)
    epoch_file: bool     # ... and model_epoch_N.pth, every --save_interval complete epochs


def due_after(plan, run, global_step):
    """What follows optimizer step `global_step` (counted from 1) of the plan; run: RunSettings."""
    epoch, step_in_epoch = (global_step - 1) // plan.steps_per_epoch, (global_step - 1) % plan.steps_per_epoch + 1
    epoch_end = step_in_epoch == plan.steps_in_epoch(epoch)
    complete = epoch_end and step_in_epoch == plan.steps_per_epoch
    return Due(log=step_in_epoch % run.log_interval == 0 or epoch_end,
               validate=bool(run.eval_interval) and global_step % run.eval_interval == 0
               and global_step != plan.total_steps,
               checkpoint=bool(run.save_steps) and global_step % run.save_steps == 0,
               epoch_end=epoch_end, epoch_complete=complete,
               epoch_file=complete and (epoch + 1) % run.save_interval == 0)


class Subset(torch.utils.data.Dataset):
    """A view on some items of a dataset, keeping their lengths (for length-grouped batching) and
    real tokens (for the forecast), as arrays: a few bytes an item, however large the dataset."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.max_seq_len = getattr(dataset, "max_seq_len", None)  # pretraining windows' length, for sample_lengths
        lengths, counts = getattr(dataset, "lengths", None), getattr(dataset, "token_counts", None)
        self.lengths = np.asarray(lengths)[self.indices] if lengths is not None else None
        self.token_counts = np.asarray(counts)[self.indices] if counts is not None else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]


class Mixture(torch.utils.data.Dataset):
    """Datasets one after another, as one: SFT conversations and the pretraining windows replayed
    beside them (--replay_data). Lengths and real tokens are kept per item, as arrays, so batches
    group items of similar length (a window's batch holds windows) and the forecast counts them."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])
        self.lengths = np.concatenate([np.asarray(sample_lengths(part)) for part in parts])
        # real tokens where a part counts them (conversations); a pretraining window is all real
        self.token_counts = np.concatenate([np.asarray(part.token_counts if getattr(part, "token_counts", None)
                                                       is not None else sample_lengths(part)) for part in parts])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][int(i - self.starts[part])]


def split_validation(dataset, fraction, seed):
    """Hold out a seeded random `fraction` of the items (at least one when fraction > 0)."""
    n = len(dataset)
    count = min(max(1, round(n * fraction)), n - 1) if fraction > 0 and n > 1 else 0
    held_out = np.sort(np.random.default_rng(seed).permutation(n)[:count])
    train = np.ones(n, dtype=bool)
    train[held_out] = False
    return Subset(dataset, np.flatnonzero(train)), (Subset(dataset, held_out) if count else None)


def sample_lengths(dataset):
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return lengths
    return np.full(len(dataset), getattr(dataset, "max_seq_len", None) or 1)  # pretraining windows: all full


def validation_batches(dataset, max_tokens, batch_size):
    """The validation set's batches: all of it, or a fixed seeded sample of at most `max_tokens`
    tokens (0 = no cap), so that a large held-out set does not stall every validation."""
    if dataset is None or len(dataset) == 0:
        return []
    lengths = sample_lengths(dataset)
    chosen = list(range(len(dataset)))
    if max_tokens and sum(lengths) > max_tokens:
        order, chosen, used = np.random.default_rng(0).permutation(len(dataset)), [], 0
        for index in order.tolist():
            if chosen and used + lengths[index] > max_tokens:
                break
            chosen.append(index)
            used += lengths[index]
        chosen.sort()
    batches = batch_indices([lengths[i] for i in chosen], batch_size, seed=0, epoch=0, shuffle=False,
                            group_by_length=True)
    return [[chosen[i] for i in batch] for batch in batches]


def epoch_steps(dataset, global_batch, seed, epoch):
    """The samples of each optimizer step of one epoch, a deterministic function of (seed, epoch) and
    the global batch: resuming skips the steps already done and sees exactly the same order, whatever
    the number of ranks and the per-rank batch. Samples of similar length are batched together."""
    lengths = getattr(dataset, "lengths", None)
    return batch_indices(lengths if lengths is not None else [1] * len(dataset), global_batch, seed, epoch,
                         shuffle=True, group_by_length=lengths is not None)


def micro_batches_of(step, size):
    """One optimizer step's samples cut into micro-batches of `size` (--batch_size x ranks)."""
    return [step[i:i + size] for i in range(0, len(step), size)]


def first_steps(dataset, plan, batch_size, seed, epoch):
    """The optimizer steps an epoch of the plan runs in one process, each as its micro-batches."""
    steps = epoch_steps(dataset, plan.global_batch, seed, epoch)[:plan.steps_in_epoch(epoch)]
    return [micro_batches_of(step, batch_size) for step in steps]


def cosine_schedule(warmup_steps, total_steps, peak_lr, min_lr):
    """Multiplier of the peak lr: linear warmup, then cosine decay to min_lr at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))) / peak_lr
    return factor
