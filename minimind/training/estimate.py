"""How long a run takes and how much memory it holds: its workload, counted, times measured rates.

A run's work is known before it starts: the plan fixes the optimizer steps, the data order fixes
which samples each step holds, hence its padded positions (rows x longest sample, what the compute
grows with) and its real tokens; the flags fix when it validates, saves a checkpoint and writes an
epoch file. Only the rates are unknown, and they are measured on this machine:

    wall time = startup + first validation
              + sum over steps of (seconds per padded position x the step's padded positions)
              + the first step's extra (allocations, optimizer state) + validations x one validation
              + checkpoints x one save + epoch files x one file + the end (final model, sample)

`python train.py ... --dry_run` (dry_run.py) measures every rate before training; a real run
measures its own as it goes (`Timeline`): one forecast line after its first steps, and the time
left (ETA) on every log line.
"""
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..devices import GpuMemory
from .run_log import process_memory_mib
from .schedule import Plan, due_after, first_steps, sample_lengths

FORECAST_AFTER_STEPS = 3   # a real run's forecast line: after this many steps (the first one warms up)
FORWARD_SHARE = 1 / 3      # a forward pass is about a third of a training step (backward is two forwards)
# A real run's saves until it has timed its own: torch.save with fsync wrote 160-230 MB/s on the
# development machine's disk (checkpoint.pt and model_epoch_N.pth at the default shape, busy machine).
WRITE_BYTES_PER_S = 200e6


# ---------------------------------------------------------------- clocks and memory

def seconds_since_process_start():
    """Wall time since this process started (Linux), so that a forecast counts Python's and
    torch's start-up too; None where /proc is absent."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_resident():
    """Restart the resident-memory peak (VmHWM) from what is resident now (Linux); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_resident_mib():
    return process_memory_mib("VmHWM")


def memory_now(device):
    """What the run holds now, MiB: its tensors on a CUDA GPU, what the Metal driver holds for it on
    an Apple GPU (which keeps no peak), its resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    return process_memory_mib("VmRSS")


def peak_cuda_mib(device):
    """The most the run's tensors held on a CUDA GPU (see devices.GpuMemory for what the GPU held)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def timed(kind):
    """Decorator for a Trainer method: its wall time goes to the run's timeline as `kind`."""
    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                timeline = getattr(self, "timeline", None)
                if timeline is not None:
                    timeline.spent(kind, time.perf_counter() - start)
        return run
    return decorate


# ---------------------------------------------------------------- the workload, counted

@dataclass
class Workload:
    """What a run does, step by step, counted from its plan and data order without running it.
    Arrays have one entry per optimizer step, in run order (index = global step - 1)."""
    padded: np.ndarray          # positions in the step's batches, padding included: rows x longest, summed
    tokens: np.ndarray          # real (non-pad) tokens in the step's batches; zeros when not counted
    validations: np.ndarray     # validation passes right after the step
    checkpoints: np.ndarray     # checkpoint.pt saves right after the step
    epoch_files: np.ndarray     # model_epoch_N.pth files right after the step
    steps_per_epoch: int
    epochs: int
    tokens_per_epoch: int       # real tokens in one full pass over the training set
    validation_padded: int      # padded positions of one validation pass
    initial_validation: bool    # a validation before the first step
    log_rows: int               # rows metrics.jsonl will hold

    @property
    def total_steps(self):
        return len(self.padded)

    @property
    def padding_fraction(self):
        total = int(self.padded.sum())
        return 1 - int(self.tokens.sum()) / total if total else 0.0


def batch_rows(dataset, collate):
    """Rows one sample puts in a batch (the stage's collation): 1, or 2 for a preference pair."""
    return collate([dataset[0]])["input_ids"].shape[0]


def sample_tokens(dataset, collate):
    """Real tokens of each sample as the stage's collation counts them (attention_mask): the
    dataset's own count when it keeps one (from its cache's offsets), else one sample at a time;
    pretraining windows are all full, so one of them tells for all."""
    if getattr(dataset, "token_counts", None) is not None:
        return np.asarray(dataset.token_counts, dtype=np.int64)
    if getattr(dataset, "lengths", None) is None:
        return np.full(len(dataset), int(collate([dataset[0]])["attention_mask"].sum()))
    return np.array([int(collate([dataset[i]])["attention_mask"].sum()) for i in range(len(dataset))])


def count_workload(trainer, batch_size=None, count_tokens=True):
    """The Workload of the trainer's run (after its setup), or of the same run at another batch
    size. count_tokens=False skips the real-token count (a pass over the data), which the timing
    does not need."""
    from dataclasses import replace

    config = trainer.config
    optim = replace(config.optim, batch_size=batch_size or config.optim.batch_size)
    plan = trainer.plan if batch_size is None else Plan.make(len(trainer.train_set), optim)
    lengths = np.asarray(sample_lengths(trainer.train_set))
    rows = batch_rows(trainer.train_set, trainer.collate)
    real = sample_tokens(trainer.train_set, trainer.collate) if count_tokens else np.zeros(len(lengths), dtype=np.int64)
    padded, tokens = [], []
    for epoch in range(plan.epochs):
        for group in first_steps(trainer.train_set, plan, optim.batch_size, optim.seed, epoch):
            padded.append(sum(rows * len(batch) * int(lengths[batch].max()) for batch in group))
            tokens.append(sum(int(real[batch].sum()) for batch in group))
    workload = Workload(np.array(padded), np.array(tokens), *follow_ups(plan, config.run, bool(trainer.val_batches)),
                        steps_per_epoch=plan.steps_per_epoch, epochs=plan.epochs, tokens_per_epoch=int(real.sum()),
                        validation_padded=validation_padded(trainer), initial_validation=bool(trainer.val_batches),
                        log_rows=0)
    workload.log_rows = count_log_rows(workload, plan, config.run)
    return workload


def follow_ups(plan, run, validates):
    """Per step: the validations, checkpoint saves and epoch files that follow it, as the schedule
    (schedule.due_after) has the trainer do them."""
    validations, checkpoints, epoch_files = (np.zeros(plan.total_steps, dtype=np.int64) for _ in range(3))
    for index in range(plan.total_steps):
        due = due_after(plan, run, index + 1)
        validations[index] = validates * (due.validate + due.epoch_end)
        checkpoints[index] = due.checkpoint + due.epoch_end
        epoch_files[index] = due.epoch_file
    return validations, checkpoints, epoch_files


def validation_padded(trainer):
    if not trainer.val_batches:
        return 0
    lengths, rows = sample_lengths(trainer.val_set), batch_rows(trainer.val_set, trainer.collate)
    return sum(rows * len(batch) * max(lengths[i] for i in batch) for batch in trainer.val_batches)


def count_log_rows(workload, plan, run):
    """Rows of metrics.jsonl: one per logged step (schedule.due_after) and one per validation."""
    logged = sum(due_after(plan, run, step).log for step in range(1, plan.total_steps + 1))
    return int(workload.validations.sum()) + workload.initial_validation + logged


# ---------------------------------------------------------------- measured rates -> forecast

@dataclass
class Costs:
    """Measured seconds of each kind of work (None: not measured)."""
    startup: float                      # process start -> ready to train
    per_padded: float                   # seconds of a training step per padded position
    first_step_extra: float = 0.0       # the first step's time above the rate (allocations, optimizer state)
    validation: float = None
    checkpoint: float = None
    epoch_file: float = None
    finish: float = None                # the end of the run: final model files, plot, sample generation

    def validation_seconds(self, workload):
        """One validation: as measured, or (a resumed run that has not validated yet) a forward
        pass over the validation batches at a third of a training step's rate."""
        if self.validation is None:
            return FORWARD_SHARE * self.per_padded * workload.validation_padded
        return self.validation


@dataclass
class Forecast:
    """A run's wall time in parts (seconds) and its peak memory (MiB)."""
    startup: float
    steps: float
    validations: float
    checkpoints: float
    epoch_files: float
    finish: float
    first_epoch: float              # the first epoch: its steps, validation, saves
    peak_resident_mib: float = None
    peak_cuda_mib: float = None

    @property
    def total(self):
        return self.startup + self.steps + self.validations + self.checkpoints + self.epoch_files + self.finish

    def summary(self):
        """'about 5 min 40 s, 2.0 GB': the forecast in one line."""
        memory = self.peak_cuda_mib if self.peak_cuda_mib is not None else self.peak_resident_mib
        where = " of GPU memory" if self.peak_cuda_mib is not None else ""
        return f"about {duration_text(self.total)}" + (f", {size_text(memory * 2 ** 20)}{where}" if memory else "")


def forecast(workload, costs, from_step=0, startup=None):
    """The run's wall time from measured costs; from_step > 0 forecasts the steps after it (a
    resumed or running run), with `startup` the time already spent."""
    padded, end = workload.padded[from_step:], slice(from_step, None)
    per_step = costs.per_padded * padded.astype(float)
    validation = costs.validation_seconds(workload)
    follow = (workload.validations[end] * validation + workload.checkpoints[end] * (costs.checkpoint or 0.0)
              + workload.epoch_files[end] * (costs.epoch_file or 0.0))
    first_epoch = per_step[:workload.steps_per_epoch].sum() + follow[:workload.steps_per_epoch].sum()
    initial = validation if from_step == 0 and workload.initial_validation else 0.0
    return Forecast(
        startup=costs.startup if startup is None else startup,
        steps=float(per_step.sum()) + (costs.first_step_extra if from_step == 0 else 0.0),
        validations=float(workload.validations[end].sum() * validation + initial),
        checkpoints=float(workload.checkpoints[end].sum() * (costs.checkpoint or 0.0)),
        epoch_files=float(workload.epoch_files[end].sum() * (costs.epoch_file or 0.0)),
        finish=costs.finish or 0.0, first_epoch=float(first_epoch))


# ---------------------------------------------------------------- a real run's own forecast

class Timeline:
    """A real run's clock: the seconds of each step (validations and saves taken out) and of each
    other kind of work, and from them the forecast of the whole run and the time left.

    Until the run has written a checkpoint, an epoch file and its final files, those are counted
    at WRITE_BYTES_PER_S; after, at what they took."""

    def __init__(self, workload, first_step, model):
        self.workload, self.first_step = workload, first_step
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        # checkpoint: the trained weights and AdamW's two moments; final: model_final.pth and final/
        self.write_bytes = {"checkpoint": 3 * trainable, "epoch_file": weights, "finish": 2 * weights}
        self.optimizer_bytes = 3 * trainable  # gradients and the two moments: held at every step's peak
        self.mark, self.outside = time.perf_counter(), 0.0   # outside: non-step seconds since the mark
        self.step_seconds, self.events = [], {}
        self.device = next(model.parameters()).device
        self.base_mib = memory_now(self.device)

    def spent(self, kind, seconds):
        self.events.setdefault(kind, []).append(seconds)
        self.outside += seconds

    def step_done(self, global_step):
        """Record the step that just ended; returns the forecast line once, after the first steps."""
        now = time.perf_counter()
        self.step_seconds.append(now - self.mark - self.outside)
        self.mark, self.outside = now, 0.0
        if len(self.step_seconds) == min(FORECAST_AFTER_STEPS, self.workload.total_steps - self.first_step):
            return f"Estimate: {self.forecast(global_step).summary()} (from the first {len(self.step_seconds)} steps)"
        return None

    def costs(self):
        """Rates measured so far: steps after the first (a warm-up), validations and saves as they
        happened."""
        done = self.workload.padded[self.first_step:self.first_step + len(self.step_seconds)]
        steady = slice(1, None) if len(self.step_seconds) > 1 else slice(None)
        per_padded = sum(self.step_seconds[steady]) / max(1, int(done[steady].sum()))
        mean = {kind: sum(values) / len(values) for kind, values in self.events.items()}
        costs = Costs(startup=0.0, per_padded=per_padded, validation=mean.get("validation"))
        for kind in ("checkpoint", "epoch_file", "finish"):
            setattr(costs, kind, mean.get(kind, self.write_bytes[kind] / WRITE_BYTES_PER_S))
        return costs

    def forecast(self, global_step):
        """The whole run: the time spent so far (start-up included) and the forecast of the rest."""
        result = forecast(self.workload, self.costs(), from_step=global_step,
                          startup=seconds_since_process_start() or 0.0)
        peak = self.memory_forecast(global_step)
        if self.device.type == "cuda":  # the tensors' peak, with the allocator's reserve and the CUDA context
            gpu = GpuMemory.measure(self.device)
            result.peak_cuda_mib = peak * gpu.reserved / max(gpu.tensors, 1.0) + gpu.overhead
        else:
            result.peak_resident_mib = peak
        return result

    def time_left(self, global_step):
        return duration_text(forecast(self.workload, self.costs(), from_step=global_step, startup=0.0).total)

    def memory_forecast(self, global_step):
        """The peak so far; when a longer batch is still to come, its activations (the peak's part
        above the weights, gradients and optimizer state) scaled up to that batch's length."""
        peak = peak_cuda_mib(self.device) if self.device.type == "cuda" else peak_resident_mib()
        done = self.workload.padded[self.first_step:global_step]
        if peak is None or self.base_mib is None or not len(done):
            return peak
        ratio = self.workload.padded[self.first_step:].max() / max(1, done.max())
        fixed = self.base_mib + self.optimizer_bytes / 2 ** 20
        return peak if ratio <= 1 else fixed + max(0.0, peak - fixed) * ratio


# ---------------------------------------------------------------- text

def duration_text(seconds):
    """'40 s', '5 min 40 s', '2 h 05 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def size_text(size):
    """Bytes in decimal units, as disks and `free -h` count them: '310 MB', '2.0 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale and unit != "kB" else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"
