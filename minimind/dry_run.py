"""`python train.py ... --dry_run`: everything about a run except the training.

The run is set up exactly as the real one would be (the same flags, its data through the token
cache, its model and optimizer), with its outputs pointed at a temporary folder, and measured:

1. what-if, before the run's own steps because it holds less memory: the longest batch with
   --gradient_checkpointing (its peak memory);
2. the run's own steps: the longest batch (the memory peak, and a warm-up), the run's first step
   (a warm-up), then a few steps spread over the batch lengths (timed);
3. one validation, a checkpoint save, an epoch file and the end of the run (final model, loss
   plot, sample generation), written into the temporary folder, then measured for disk;
4. what-ifs, where the time allows: a step with --gradient_checkpointing, one at twice the batch
   (where the memory allows).

From these, estimate.forecast gives the wall time; the counts come from the run's plan and data
order. Nothing is written into --output_dir, and the token cache gains only the entry the real run
would create (and then reads). The memory what-ifs keep this order because resident memory that
a step has freed stays with the process: a measurement after a larger step would see it.
"""
import contextlib
import io
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .estimate import (Costs, batch_rows, count_workload, duration_text, forecast, peak_cuda_mib, peak_resident_mib,
                       reset_peak_resident, seconds_since_process_start, size_text)
from .run_log import describe_parameters, process_memory_mib
from .trainer import Plan, Trainer, epoch_batches, load_batch, sample_lengths

TIMED_STEPS = 3           # steps timed after the two warm-up steps
WHAT_IF_SHARE = 0.15      # what-ifs may add at most this share of the forecast run (and at least WHAT_IF_MIN_S)
WHAT_IF_MIN_S = 60


@dataclass
class WhatIf:
    """One flag changed, measured: the peak of its longest step and its seconds per step."""
    flag: str
    peak_mib: float = None          # resident (CPU) or allocated (CUDA) at its longest step
    per_padded: float = None
    total_seconds: float = None
    steps: int = None
    note: str = ""


@dataclass
class DryRunReport:
    """Everything a dry run found; `print_report` shows it."""
    config: object
    workload: object
    costs: Costs
    forecast: object
    parameters: str
    samples: tuple                  # (training, validation)
    device: str
    dtype: str
    stage: str
    step_peak_mib: float            # resident (CPU) or allocated (CUDA) during the run's own steps
    disk: dict                      # file or folder -> bytes the run will write
    free_disk: int
    what_ifs: list = field(default_factory=list)
    seconds: float = 0.0


class DryRunTrainer(Trainer):
    """The run's own trainer, its data loading timed (to tell start-up with and without a token
    cache) and its log lines kept quiet."""

    def load_data(self):
        start = time.perf_counter()
        super().load_data()
        self.data_seconds = time.perf_counter() - start

    def say(self, text):
        pass


def dry_run(config):
    print_report(measure(config))
    return 0


def measure(config):
    """Set the run up in a temporary folder, measure it, forecast it; returns a DryRunReport."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="minimind-dry-run-"))
    try:
        trainer = DryRunTrainer(replace(config, run=replace(config.run, output_dir=str(scratch), resume=False)))
        trainer.setup()
        startup = startup_seconds(trainer)
        workload = count_workload(trainer)
        sizes = {}
        report = measure_phases(trainer, workload, startup, scratch, sizes)
        report.disk, report.free_disk = sizes, shutil.disk_usage(nearest_existing(config.run.output_dir)).free
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.config = config
    report.seconds = time.perf_counter() - started
    return report


def startup_seconds(trainer):
    """Process start -> ready to train, as the real run will spend it: when this dry run filled the
    token cache, the real run reads it instead, so that part is timed again from the cache."""
    elapsed = seconds_since_process_start()
    if elapsed is None:
        return 0.0
    datasets = (trainer.train_set, trainer.val_set)
    if all(getattr(getattr(d, "dataset", d), "cache_hit", True) for d in datasets if d is not None):
        return elapsed
    tokenizing = trainer.data_seconds
    trainer.load_data()
    return elapsed - tokenizing + trainer.data_seconds


def measure_phases(trainer, workload, startup, scratch, sizes):
    device = trainer.device
    startup_peak = peak_resident_mib()
    groups, padded = first_epoch_steps(trainer, trainer.config.optim.batch_size)
    longest = int(np.argmax(padded))
    what_ifs = []
    checkpointing = trainer.config.model.gradient_checkpointing or trainer.config.model.compile
    if not checkpointing:
        what_ifs.append(WhatIf("--gradient_checkpointing"))
        with gradient_checkpointing(trainer.model):
            what_ifs[-1].peak_mib = step_peak(trainer, groups[longest])
    before_steps = memory_now(device)
    costs, step_peak_mib = time_run_steps(trainer, groups, padded, longest, startup)
    measure_outputs(trainer, costs, scratch, sizes, workload)
    run_forecast = forecast(workload, costs)
    run_forecast.peak_resident_mib = max(filter(None, [startup_peak, peak_resident_mib()]), default=None)
    run_forecast.peak_cuda_mib = peak_cuda_mib(device)
    budget = max(WHAT_IF_MIN_S, WHAT_IF_SHARE * run_forecast.total)
    if what_ifs:
        finish_checkpointing_what_if(trainer, what_ifs[0], groups, padded, workload, costs, budget)
    what_ifs.append(double_batch_what_if(trainer, costs, step_peak_mib - (before_steps or 0), budget))
    return DryRunReport(
        config=None, workload=workload, costs=costs, forecast=run_forecast,
        parameters=describe_parameters(trainer.model), device=str(device),
        samples=(len(trainer.train_set), len(trainer.val_set) if trainer.val_set is not None else 0),
        dtype=str(trainer.dtype).replace("torch.", ""), stage=trainer.stage.name, step_peak_mib=step_peak_mib,
        disk={}, free_disk=0, what_ifs=[w for w in what_ifs if w is not None])


def first_epoch_steps(trainer, batch_size):
    """The first epoch's optimizer steps at `batch_size` (lists of micro-batches of sample indices),
    in run order, as many as the run takes in it, and each one's padded positions."""
    optim = replace(trainer.config.optim, batch_size=batch_size)
    batches = epoch_batches(trainer.train_set, batch_size, optim.seed, 0)
    steps = Plan.make(len(trainer.train_set), optim).steps_in_epoch(0)
    groups = [batches[i:i + optim.accumulation_steps]
              for i in range(0, steps * optim.accumulation_steps, optim.accumulation_steps)]
    lengths, rows = np.asarray(sample_lengths(trainer.train_set)), batch_rows(trainer.train_set)
    return groups, np.array([rows * sum(len(b) * int(lengths[b].max()) for b in group) for group in groups])


def time_step(trainer, group):
    """One of the trainer's own optimizer steps on these micro-batches, data loading included."""
    synchronize(trainer.device)
    start = time.perf_counter()
    trainer.window_tokens = 0
    trainer.step([load_batch(trainer.train_set, indices, trainer.device) for indices in group])
    synchronize(trainer.device)
    return time.perf_counter() - start


def step_peak(trainer, group):
    """The peak memory of one step from here: resident (CPU) or allocated (CUDA), MiB."""
    reset_peaks(trainer.device)
    time_step(trainer, group)
    return phase_peak(trainer.device)


def time_run_steps(trainer, groups, padded, longest, startup):
    """The run's own steps: the longest (its memory peak; a warm-up), the first in run order (a
    warm-up), then TIMED_STEPS spread over the batch lengths: seconds per padded position."""
    reset_peaks(trainer.device)
    first_seconds = time_step(trainer, groups[longest])
    step_peak_mib = phase_peak(trainer.device)
    time_step(trainer, groups[0])
    order = np.argsort(padded, kind="stable")
    chosen = [int(order[int((k + 0.5) * len(order) / TIMED_STEPS)]) for k in range(TIMED_STEPS)]
    seconds = sum(time_step(trainer, groups[i]) for i in chosen)
    per_padded = seconds / int(padded[chosen].sum())
    extra = max(0.0, first_seconds - per_padded * int(padded[longest]))
    return Costs(startup=startup, per_padded=per_padded, first_step_extra=extra), step_peak_mib


def measure_outputs(trainer, costs, scratch, sizes, workload):
    """Validation, a checkpoint, an epoch file and the end of the run, as the real run does them,
    into the temporary folder; then what each file would take on disk."""
    costs.validation = seconds_of(lambda: setattr(trainer, "first_val", trainer.validate()))
    trainer.last_val = trainer.first_val
    costs.checkpoint = seconds_of(trainer.save)
    costs.epoch_file = seconds_of(lambda: trainer.save_epoch_model(1))
    with contextlib.redirect_stdout(io.StringIO()):
        costs.finish = seconds_of(trainer.finish)
    sizes.update(disk_use(scratch, workload))


def seconds_of(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def disk_use(scratch, workload):
    """Bytes the run will leave in --output_dir, from what the measured saves wrote: one epoch file
    per saved epoch, the logs grown to the run's number of rows."""
    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size

    found = {p.name: size(p) for p in scratch.iterdir()}
    epoch_file = found.pop("model_epoch_1.pth", 0)
    log_rows = max(1, sum(1 for _ in open(scratch / "metrics.jsonl"))) if (scratch / "metrics.jsonl").exists() else 1
    logs = sum(found.pop(name, 0) for name in ("metrics.jsonl", "tensorboard")) * workload.log_rows / log_rows
    logs += sum(found.pop(name, 0) for name in ("loss.png", "run_config.yaml"))
    disk = {name: found[name] for name in ("checkpoint.pt", "model_final.pth", "final", "adapter") if name in found}
    if workload.epoch_files.sum():
        disk[f"{int(workload.epoch_files.sum())} x model_epoch_N.pth"] = int(workload.epoch_files.sum()) * epoch_file
    disk["config.json and logs"] = int(logs + found.get("config.json", 0))
    return disk


def finish_checkpointing_what_if(trainer, what_if, groups, padded, workload, costs, budget):
    """Time one middling step with --gradient_checkpointing (its peak was measured first)."""
    middle = int(np.argsort(padded, kind="stable")[len(padded) // 2])
    if FORWARD_PLUS_BACKWARD_WITH_RECOMPUTE * costs.per_padded * padded[middle] > budget:
        what_if.note = "its time not measured (over the dry run's time budget)"
        return
    with gradient_checkpointing(trainer.model):
        what_if.per_padded = time_step(trainer, groups[middle]) / int(padded[middle])
    what_if.total_seconds = forecast(workload, replace(costs, per_padded=what_if.per_padded)).total
    what_if.steps = workload.total_steps


FORWARD_PLUS_BACKWARD_WITH_RECOMPUTE = 4 / 3   # recomputing the forward in backward: one more forward


def double_batch_what_if(trainer, costs, step_growth_mib, budget):
    """The longest step at twice --batch_size: its peak and seconds per padded position, and the
    run it would make (fewer, larger steps). Skipped when it might not fit in memory."""
    batch_size = 2 * trainer.config.optim.batch_size
    what_if = WhatIf(f"--batch_size {batch_size}")
    groups, padded = first_epoch_steps(trainer, batch_size)
    longest = int(np.argmax(padded))
    if costs.per_padded * padded[longest] > budget:
        return None
    if trainer.device.type == "cpu" and not fits_twice(step_growth_mib):
        what_if.note = "not measured: it might not fit in the memory available now"
        return what_if
    try:
        reset_peaks(trainer.device)
        seconds = time_step(trainer, groups[longest])
    except torch.OutOfMemoryError:
        what_if.note = "does not fit in GPU memory"
        return what_if
    what_if.peak_mib = phase_peak(trainer.device)
    what_if.per_padded = seconds / int(padded[longest])
    workload = count_workload(trainer, batch_size=batch_size, count_tokens=False)
    what_if.total_seconds = forecast(workload, replace(costs, per_padded=what_if.per_padded)).total
    what_if.steps = workload.total_steps
    return what_if


def fits_twice(step_growth_mib):
    """Whether a step whose memory grows twice as much as this one's fits, with room to spare, in
    what the system has available now."""
    available = memory_available_mib()
    return available is None or 2 * step_growth_mib < 0.8 * available


def memory_now(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return process_memory_mib("VmRSS")


def memory_available_mib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def gradient_checkpointing(model):
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = core.model.gradient_checkpointing
    core.model.gradient_checkpointing = True
    try:
        yield
    finally:
        core.model.gradient_checkpointing = before


def reset_peaks(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_resident()


def phase_peak(device):
    return peak_cuda_mib(device) if device.type == "cuda" else peak_resident_mib()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nearest_existing(path):
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


# ---------------------------------------------------------------- the report

def print_report(report):
    """The forecast, in the order a user asks: how big, how much data, how long, how much memory,
    how much disk, and what would change it."""
    config, workload, costs, result = report.config, report.workload, report.costs, report.forecast
    optim, out = config.optim, config.run.output_dir
    print(f"Dry run: the run is set up and measured, not trained; nothing is written to {out}.")
    print(f"Model {report.parameters}; {report.stage} on {report.device} in {report.dtype}")
    print(f"Data: {report.samples[0]} training samples ({workload.tokens_per_epoch:,} tokens an epoch), "
          f"{report.samples[1]} validation samples")
    print(f"Plan: {workload.epochs} epoch{'s' if workload.epochs != 1 else ''}, {workload.total_steps} optimizer "
          f"steps ({workload.steps_per_epoch} an epoch) of {optim.batch_size} x {optim.accumulation_steps} "
          f"sequences, {int(workload.tokens.sum()):,} tokens in all")
    if workload.padding_fraction > 0:
        print(f"Padding: {100 * workload.padding_fraction:.1f}% of the positions in the batches")
    steps_seconds = result.steps - costs.first_step_extra
    print(f"Measured: {costs.per_padded * workload.padded.mean():.2f} s a step on average "
          f"({workload.tokens.sum() / max(steps_seconds, 1e-9):.0f} tokens/s; {TIMED_STEPS} steps timed after 2 "
          f"warm-up steps), a validation {costs.validation:.1f} s, a checkpoint {costs.checkpoint:.1f} s, an epoch "
          f"file {costs.epoch_file:.1f} s, the end of the run {costs.finish:.1f} s, start-up {costs.startup:.0f} s")
    print(f"Wall time: about {duration_text(result.first_epoch)} an epoch, {duration_text(result.total)} in all "
          f"(steps {duration_text(result.steps)}, {int(workload.validations.sum()) + workload.initial_validation} "
          f"validations {duration_text(result.validations)}, saves "
          f"{duration_text(result.checkpoints + result.epoch_files + result.finish)}, start-up "
          f"{duration_text(result.startup)})")
    print(f"Peak memory: {memory_text(result)}")
    total = sum(report.disk.values())
    parts = ", ".join(f"{name} {size_text(size)}" for name, size in report.disk.items())
    print(f"Disk: {size_text(total)} in {out} ({parts}); {size_text(report.free_disk)} free there")
    warn_if_short(report, total)
    if report.what_ifs:
        print("What would change it (measured now, on the longest batch):")
        for what_if in report.what_ifs:
            print(f"  {what_if_text(what_if, report)}")
    print(f"Estimate: {result.summary()} (this dry run took {duration_text(report.seconds)})")


def memory_text(result):
    parts = []
    if result.peak_resident_mib is not None:
        parts.append(f"{result.peak_resident_mib:.0f} MiB resident ({size_text(result.peak_resident_mib * 2 ** 20)})")
    if result.peak_cuda_mib is not None:
        parts.append(f"{result.peak_cuda_mib:.0f} MiB of GPU tensors")
    return ", ".join(parts) or "not measurable here"


def what_if_text(what_if, report):
    if what_if.peak_mib is None and what_if.per_padded is None:
        return f"{what_if.flag}: {what_if.note}"
    parts = []
    if what_if.peak_mib is not None:
        parts.append(f"{size_text(what_if.peak_mib * 2 ** 20)} at its longest step instead of "
                     f"{size_text(report.step_peak_mib * 2 ** 20)}")
    if what_if.total_seconds is not None:
        parts.append(f"about {duration_text(what_if.total_seconds)} in all ({what_if.steps} steps)")
    if what_if.note:
        parts.append(what_if.note)
    return f"{what_if.flag}: " + ", ".join(parts)


def warn_if_short(report, disk_bytes):
    """Say so when the forecast does not fit in what the machine has free now."""
    if disk_bytes > report.free_disk:
        print(f"Warning: the run will write {size_text(disk_bytes)}, more than the {size_text(report.free_disk)} "
              f"free in {report.config.run.output_dir}")
    available = memory_available_mib()
    peak = report.forecast.peak_resident_mib
    if available is not None and peak is not None and peak > available + (process_memory_mib("VmRSS") or 0):
        print(f"Warning: the run's peak, {peak:.0f} MiB, is more than the {available:.0f} MiB of memory available now")
