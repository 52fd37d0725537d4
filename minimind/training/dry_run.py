"""`python train.py ... --dry_run`: everything about a run except the training.

The run is set up exactly as the real one would be (the same flags, its data through the token
cache, its model and optimizer), with its outputs pointed at a temporary folder, and measured in
this order:

1. what-if --gradient_checkpointing: the peak memory of the run's longest batch with it;
2. the run's own longest batch (its memory peak; a warm-up) and its first step (a warm-up);
3. one validation, a checkpoint save and an epoch file, as at an epoch's end;
4. a few of the run's steps spread over its batch lengths, timed: seconds per padded position;
5. the end of the run (final model files, loss plot, sample generation), then the disk all of it
   takes;
6. what-ifs, within a time budget, in training mode again: a step with --gradient_checkpointing,
   one at twice the batch (where the memory allows);
7. on a CUDA GPU, the largest --batch_size that fits it: the step's tensors grow linearly with the
   batch (through the two batch sizes measured, or the one and the weights, gradients and optimizer
   state held at every step), plus the allocator's reserve and the CUDA context (devices.GpuMemory).

estimate.forecast turns these into the run's wall time; the step and token counts come from the
run's plan and data order. Nothing is written into --output_dir, and the token cache gains only
the entry the real run would create (and then reads).

Why this order: memory a step has freed stays resident in the process, so a memory measurement
is only clean before anything larger has run (1 before 2, 6's larger batch last); the timed
steps come after the saves, as most of a real run's steps do, so that they run in the memory
that the saves leave behind.
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

from ..devices import GpuMemory, empty_cache, is_out_of_memory, synchronize
from .checkpoint import load_training_state
from .estimate import (Costs, batch_rows, count_workload, duration_text, forecast, memory_now, peak_cuda_mib,
                       peak_resident_mib, reset_peak_resident, seconds_since_process_start, size_text)
from .run_log import describe_parameters, process_memory_mib
from .schedule import Plan, first_steps, sample_lengths
from .trainer import CHECKPOINT_NAME, Trainer, load_batch

TIMED_STEPS = 3           # steps timed after the two warm-up steps
WHAT_IF_SHARE = 0.15      # what-ifs may add at most this share of the forecast run (and at least WHAT_IF_MIN_S)
WHAT_IF_MIN_S = 60
GPU_SHARE = 0.95          # the largest batch that fits leaves this much of the GPU's memory free


@dataclass
class WhatIf:
    """One flag changed, measured: the peak of its longest step, its seconds per padded position,
    and the run it would make."""
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
    step_peak_mib: float            # resident (CPU) or allocated (CUDA) at the run's longest step
    disk: dict                      # file or folder -> bytes the run will write
    free_disk: int
    what_ifs: list = field(default_factory=list)
    steps_done: int = 0             # under --resume: the forecast is for the steps after these
    seconds: float = 0.0
    gpu: GpuMemory = None           # on a CUDA GPU: what the run's own steps held at most
    largest_batch: "LargestBatch" = None


@dataclass
class LargestBatch:
    """The largest --batch_size whose longest step fits in GPU_SHARE of the GPU, and the memory model
    behind it: a step at batch B holds fixed_mib + per_sample_mib x B of GPU memory."""
    batch_size: int
    fixed_mib: float
    per_sample_mib: float

    def peak_mib(self, batch_size=None):
        return self.fixed_mib + self.per_sample_mib * (batch_size or self.batch_size)


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
    """Set the run up with its outputs in a temporary folder, measure it, forecast it; returns a
    DryRunReport. Nothing is written into config.run.output_dir."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="minimind-dry-run-"))
    try:
        trainer = DryRunTrainer(replace(config, run=replace(config.run, output_dir=str(scratch), resume=False)))
        trainer.setup()
        report = DryRun(trainer, scratch, steps_done(config)).measure()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.config = config
    report.free_disk = shutil.disk_usage(nearest_existing(config.run.output_dir)).free
    report.seconds = time.perf_counter() - started
    return report


class DryRun:
    """The measurements of one set-up run, in the order they must happen (see the module's docstring)."""

    def __init__(self, trainer, scratch, steps_done=0):
        self.trainer, self.scratch, self.device = trainer, scratch, trainer.device
        self.steps_done = steps_done  # under --resume: the steps the checkpoint has done
        self.costs = Costs(startup=startup_seconds(trainer), per_padded=0.0)
        self.workload = count_workload(trainer)
        self.groups, self.padded = first_epoch_steps(trainer, trainer.config.optim.batch_size)
        self.longest = int(np.argmax(self.padded))
        self.what_ifs = []
        self.start_mib = memory_now(self.device)  # weights (and a reference or teacher), before any step
        self.gpu = None

    def measure(self):
        startup_peak = peak_resident_mib()
        model = self.trainer.config.model
        if not (model.gradient_checkpointing or model.compile):
            self.what_ifs.append(WhatIf("--gradient_checkpointing"))
            with gradient_checkpointing(self.trainer.model):
                self.what_ifs[0].peak_mib = self.step_peak(self.groups[self.longest])
        before_steps = memory_now(self.device)
        self.warm_up()
        self.costs.validation = seconds_of(self.validate)
        self.costs.checkpoint = seconds_of(self.trainer.save)
        self.costs.epoch_file = seconds_of(lambda: self.trainer.save_epoch_model(1))
        self.time_steps()
        with contextlib.redirect_stdout(io.StringIO()):
            self.costs.finish = seconds_of(self.trainer.finish)
        result = forecast(self.workload, self.costs, from_step=self.steps_done, startup=self.costs.startup)
        result.peak_resident_mib = max(filter(None, [startup_peak, peak_resident_mib()]), default=None)
        if self.device.type == "cuda":  # since warm_up reset the peaks: the run's own steps, saves, end
            self.gpu = GpuMemory.measure(self.device)
            result.peak_cuda_mib = self.gpu.total
        self.trainer.model.train()  # the end of the run left it in eval mode (its sample generation)
        self.measure_what_ifs(max(WHAT_IF_MIN_S, WHAT_IF_SHARE * result.total), before_steps)
        return DryRunReport(
            config=None, workload=self.workload, costs=self.costs, forecast=result,
            parameters=describe_parameters(self.trainer.model), device=str(self.device),
            samples=(len(self.trainer.train_set), len(self.trainer.val_set or ())),
            dtype=str(self.trainer.dtype).replace("torch.", ""), stage=self.trainer.stage.name,
            step_peak_mib=self.step_peak_mib, disk=disk_use(self.scratch, self.workload), free_disk=0,
            what_ifs=self.what_ifs, steps_done=self.steps_done, gpu=self.gpu,
            largest_batch=self.largest_batch() if self.gpu else None)

    def warm_up(self):
        """The longest batch (the run's memory peak) and the run's first step. The first step's time
        above the rate (allocations, optimizer state) is what the real run's first step adds."""
        reset_peaks(self.device)
        self.first_seconds = time_step(self.trainer, self.groups[self.longest])
        self.step_peak_mib = phase_peak(self.device)
        time_step(self.trainer, self.groups[0])

    def time_steps(self):
        """TIMED_STEPS steps spread over the batch lengths (quantiles of their padded positions), so
        that their mean is the run's: seconds per padded position."""
        order = np.argsort(self.padded, kind="stable")
        chosen = [int(order[int((k + 0.5) * len(order) / TIMED_STEPS)]) for k in range(TIMED_STEPS)]
        seconds = sum(time_step(self.trainer, self.groups[i]) for i in chosen)
        self.costs.per_padded = seconds / int(self.padded[chosen].sum())
        self.costs.first_step_extra = max(0.0, self.first_seconds - self.costs.per_padded * self.padded[self.longest])

    def validate(self):
        self.trainer.first_val = self.trainer.last_val = self.trainer.validate()

    def step_peak(self, group):
        """The peak memory of one step from here: resident (CPU) or allocated (CUDA), MiB."""
        reset_peaks(self.device)
        time_step(self.trainer, group)
        return phase_peak(self.device)

    def measure_what_ifs(self, budget, before_steps):
        """Within `budget` seconds: a middling step with --gradient_checkpointing (its peak was
        measured first), the longest step at twice the batch (where the memory allows)."""
        if self.what_ifs:
            middle = int(np.argsort(self.padded, kind="stable")[len(self.padded) // 2])
            if RECOMPUTE_FACTOR * self.costs.per_padded * self.padded[middle] <= budget:
                with gradient_checkpointing(self.trainer.model):
                    seconds = time_step(self.trainer, self.groups[middle])
                self.forecast_what_if(self.what_ifs[0], seconds / int(self.padded[middle]), self.workload)
            else:
                self.what_ifs[0].note = "its time not measured (over the dry run's time budget)"
        if self.steps_done or self.trainer.config.model.compile:
            return  # a resumed run keeps its batch size; a compiled model would compile again for it
        growth = self.step_peak_mib - before_steps if before_steps is not None else None
        double = self.double_batch(budget, growth)
        if double is not None:
            self.what_ifs.append(double)

    def double_batch(self, budget, growth_mib):
        batch_size = 2 * self.trainer.config.optim.batch_size
        what_if = WhatIf(f"--batch_size {batch_size}")
        groups, padded = first_epoch_steps(self.trainer, batch_size)
        longest = int(np.argmax(padded))
        if self.costs.per_padded * padded[longest] > budget:
            return None
        if self.device.type == "cpu" and not fits_twice(growth_mib):
            what_if.note = "not measured: it might not fit in the memory available now"
            return what_if
        try:
            reset_peaks(self.device)
            seconds = time_step(self.trainer, groups[longest])
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            self.trainer.optimizer.zero_grad(set_to_none=True)
            empty_cache(self.device)
            what_if.note = "does not fit in GPU memory"
            return what_if
        what_if.peak_mib = phase_peak(self.device)
        workload = count_workload(self.trainer, batch_size=batch_size, count_tokens=False)
        self.forecast_what_if(what_if, seconds / int(padded[longest]), workload)
        return what_if

    def largest_batch(self):
        """The largest batch that fits, from the longest step's tensors at the run's batch and at
        twice it (else with the weights, gradients and AdamW's two moments as the fixed part)."""
        batch = self.trainer.config.optim.batch_size
        double = next((w for w in self.what_ifs if w.flag == f"--batch_size {2 * batch}" and w.peak_mib), None)
        trainable = sum(p.numel() * p.element_size() for p in self.trainer.model.parameters() if p.requires_grad)
        return largest_batch(batch, self.step_peak_mib, double.peak_mib if double else None,
                             self.start_mib + 3 * trainable / 2 ** 20, self.gpu)

    def forecast_what_if(self, what_if, per_padded, workload):
        what_if.per_padded = per_padded
        what_if.total_seconds = forecast(workload, replace(self.costs, per_padded=per_padded),
                                         from_step=self.steps_done, startup=self.costs.startup).total
        what_if.steps = workload.total_steps


def largest_batch(batch_size, peak_mib, double_peak_mib, fixed_mib, gpu):
    """LargestBatch for a step whose tensors peak at `peak_mib` at `batch_size` and `double_peak_mib`
    at twice it (None: not measured; `fixed_mib`, what every step holds, is the other point), in GPU
    memory: the tensors times the allocator's reserve over them (as the run measured it), plus the
    CUDA context. None when the step does not grow with the batch (nothing to tell)."""
    if double_peak_mib is not None:
        per_sample = (double_peak_mib - peak_mib) / batch_size
        fixed_mib = peak_mib - per_sample * batch_size
    else:
        per_sample = (peak_mib - fixed_mib) / batch_size
    if per_sample <= 0:
        return None
    reserve = gpu.reserved / max(gpu.tensors, 1.0)
    model = LargestBatch(0, reserve * fixed_mib + gpu.overhead, reserve * per_sample)
    model.batch_size = int((GPU_SHARE * gpu.capacity - model.fixed_mib) / model.per_sample_mib)
    return model if model.batch_size >= 1 else None


RECOMPUTE_FACTOR = 4 / 3   # with gradient checkpointing a step runs the forward once more: ~4/3 the time


def steps_done(config):
    """Under --resume, the optimizer steps the checkpoint in --output_dir has done (0 without one)."""
    path = Path(config.run.output_dir) / CHECKPOINT_NAME
    if not (config.run.resume and path.exists()):
        return 0
    return int(load_training_state(path)["progress"]["global_step"])


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


def first_epoch_steps(trainer, batch_size):
    """The first epoch's optimizer steps at `batch_size` (lists of micro-batches of sample indices),
    in run order, as many as the run takes in it, and each one's padded positions."""
    optim = replace(trainer.config.optim, batch_size=batch_size)
    groups = first_steps(trainer.train_set, Plan.make(len(trainer.train_set), optim), batch_size, optim.seed, 0)
    lengths, rows = np.asarray(sample_lengths(trainer.train_set)), batch_rows(trainer.train_set, trainer.collate)
    return groups, np.array([rows * sum(len(b) * int(lengths[b].max()) for b in group) for group in groups])


def time_step(trainer, group):
    """One of the trainer's own optimizer steps on these micro-batches, data loading included."""
    synchronize(trainer.device)
    start = time.perf_counter()
    trainer.window_tokens = 0
    trainer.step([load_batch(trainer.train_set, indices, trainer.collate, trainer.device) for indices in group])
    synchronize(trainer.device)
    return time.perf_counter() - start


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
    metrics_path = scratch / "metrics.jsonl"
    rows = max(1, len(metrics_path.read_text().splitlines())) if metrics_path.exists() else 1
    logs = sum(found.pop(name, 0) for name in ("metrics.jsonl", "tensorboard")) * workload.log_rows / rows
    logs += sum(found.pop(name, 0) for name in ("loss.png", "run_config.yaml", "config.json"))
    disk = {name: found[name] for name in ("checkpoint.pt", "model_final.pth", "final", "adapter") if name in found}
    files = int(workload.epoch_files.sum())
    if files:
        disk[f"{files} x model_epoch_N.pth"] = files * epoch_file
    disk["config.json and logs"] = int(logs)
    return disk


def fits_twice(growth_mib):
    """Whether a step whose memory grows twice as much as the run's longest step fits, with room
    to spare, in what the system has available now."""
    available = memory_available_mib()
    return available is None or growth_mib is None or 2 * growth_mib < 0.8 * available


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
    """Start a phase's peak from what is held now (on a CUDA GPU, with the cache handed back, so that
    the reserve measured is this phase's)."""
    if device.type == "cuda":
        empty_cache(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        reset_peak_resident()


def phase_peak(device):
    """A phase's peak: CUDA tensors, the resident memory on a CPU; on an Apple GPU, which keeps no
    peak, what its driver holds after the phase."""
    if device.type == "cuda":
        return peak_cuda_mib(device)
    return memory_now(device) if device.type == "mps" else peak_resident_mib()


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
    if report.steps_done:
        print(f"Resuming: {report.steps_done} of the {workload.total_steps} steps are done "
              f"({Path(out) / CHECKPOINT_NAME}); the wall time below is for the rest")
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
    print(f"Peak memory: {memory_text(result, report.gpu)}")
    largest = report.largest_batch
    if largest is not None:
        print(f"Largest --batch_size that fits: {largest.batch_size} (forecast peak {largest.peak_mib():.0f} MiB of "
              f"{report.gpu.capacity:.0f} MiB: {largest.fixed_mib:.1f} MiB + {largest.per_sample_mib:.1f} MiB a sample)")
    total = sum(report.disk.values())
    parts = ", ".join(f"{name} {size_text(size)}" for name, size in report.disk.items())
    print(f"Disk: {size_text(total)} in {out} ({parts}); {size_text(report.free_disk)} free there")
    warn_if_short(report, total)
    if report.what_ifs:
        print("What would change it (measured now, on the longest batch):")
        for what_if in report.what_ifs:
            print(f"  {what_if_text(what_if, report)}")
    print(f"Estimate: {result.summary()} (this dry run took {duration_text(report.seconds)})")


def memory_text(result, gpu=None):
    parts = []
    if result.peak_resident_mib is not None:
        parts.append(f"{result.peak_resident_mib:.0f} MiB resident ({size_text(result.peak_resident_mib * 2 ** 20)})")
    if gpu is not None:
        parts.append(gpu.describe())
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
    if report.gpu is not None and report.gpu.total > report.gpu.capacity:
        print(f"Warning: the run's peak, {report.gpu.total:.0f} MiB of GPU memory, is more than the GPU's "
              f"{report.gpu.capacity:.0f} MiB: lower --batch_size or add --gradient_checkpointing")
    available = memory_available_mib()
    peak = report.forecast.peak_resident_mib
    if available is not None and peak is not None and peak > available + (process_memory_mib("VmRSS") or 0):
        print(f"Warning: the run's peak, {peak:.0f} MiB, is more than the {available:.0f} MiB of memory available now")
