"""One prepared check of every CUDA path, with its figures, for a short window on a GPU machine.

    python bench/gpu_check.py                             # cuda:0, at most 8 minutes, report in gpu_check/
    python bench/gpu_check.py --output_dir /tmp/check --budget 300 --only correctness,speed
    python bench/gpu_check.py --device cpu --tiny         # every part on tiny shapes: under a minute (tests)

The parts, in order; each runs under its own time limit, and one that fails, crashes or runs out
of time is reported as such while the next one starts:

  correctness  logits on the device against the CPU (float32, within 1e-4) and against the original
               MiniMind code's (the test fixtures), both families; a bfloat16 run's losses against
               float32's over its first 50 steps; KV-cache decode against a full forward, left-padded
               rows against the same rows alone; exact resume after an interrupt (dropout on)
  speed        train.py's tokens/s at the seed's shape and at 104M, bfloat16, with and without
               --compile, and model FLOPs utilisation against the chip's bfloat16 peak (a table of
               known chips below) and against a matmul measured here; transformers' LlamaForCausalLM
               of the same shape trained in this process, the baseline
  memory       the dry run's largest --batch_size that fits the GPU and its forecast peak, against a
               real run at that batch (on a CPU: the dry run's peak against the real run's)
  stages       SFT, DPO, GRPO, distillation and LoRA: a few steps each
  inference    decode tokens/s at batch 1 and 32; `minimind serve` under 32 concurrent clients
  distributed  torchrun with one process on NCCL: data parallel, --fsdp, --fsdp with LoRA

Training runs go through the command line (`python train.py ...`, one process each, as a user
runs them; with --tiny inside this process, where a new interpreter would cost more than the
run). Reports: report.md (a table) and report.json in --output_dir, rewritten after each part,
so an interrupted check leaves what it measured; logs/ holds every run's output. A row's status
is pass or fail (a check with a criterion), measured (a figure), skipped (with the reason:
"needs CUDA" for what a CPU cannot exercise), error (it could not run; the reason) or timeout.
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

# Dense tensor-core TFLOP/s (no sparsity) from the vendors' data sheets, by device name: (pattern,
# bfloat16, float16). None: the chip has no bfloat16 units (T4 and V100 emulate it, slowly).
PEAK_TFLOPS = [
    (r"H200 NVL", 835, 835), (r"GH200|H200", 989, 989), (r"H100 NVL", 835, 835), (r"H100 PCIe", 756, 756),
    (r"H100|H800", 989, 989), (r"A100|A800", 312, 312), (r"L40S", 362, 362), (r"L40\b", 181, 181),
    (r"\bL4\b", 121, 121), (r"\bA10\b", 125, 125), (r"RTX A6000", 155, 155), (r"RTX 4090", 165, 165),
    (r"RTX 3090", 71, 71), (r"\bT4\b", None, 65), (r"V100", None, 125),
]

# name -> train.py's shape flags and the sequence length; --tiny swaps in the tiny column
SHAPES = {
    "default": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_key_value_heads": 2, "max_seq_len": 512},
    "104m": {"hidden_size": 768, "num_layers": 16, "num_heads": 8, "num_key_value_heads": 2, "max_seq_len": 512},
}
TINY_SHAPES = {
    "default": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_key_value_heads": 2, "max_seq_len": 64},
    "104m": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_key_value_heads": 2, "max_seq_len": 64},
}

LOGIT_TOLERANCE = 1e-4
# bfloat16 against float32 over the first 50 steps: the mean and the largest relative difference of
# the step losses. On the CPU (autocast, the seed's shape, batch 16 x 256, lr 5e-4) they measured 0.01%
# and 0.13%; a GPU's bfloat16 kernels round differently, hence the margin, which a wrong cast still exceeds.
CURVE_MEAN_TOLERANCE, CURVE_MAX_TOLERANCE = 0.005, 0.02
# the dry run's forecast of a run's peak memory against the run's own: forecast / measured within these
MEMORY_RATIO_RANGE = (0.8, 1.25)


@dataclass
class Settings:
    """What each part runs at: a GPU's sizes, or --tiny's (seconds on a CPU)."""
    curve_steps: int = 50
    curve_batch: int = 16
    resume_steps: int = 12
    resume_stop: int = 5
    speed_batch: int = 32
    speed_steps: int = 30
    speed_skip: int = 5            # first steps left out of the rate (warm-up, compilation)
    llama_steps: int = 10
    memory_shape: str = "104m"
    memory_batch: int = 16
    stage_steps: int = 3
    stage_batch: int = 8
    grpo_new_tokens: int = 32
    decode_tokens: int = 128
    decode_batch: int = 32
    serve_clients: int = 32
    serve_requests: int = 2
    serve_tokens: int = 64
    corpus_copies: int = 8         # the bundled corpus repeated: one epoch holds every timed step

    @classmethod
    def tiny(cls):
        return cls(curve_steps=20, curve_batch=8, resume_steps=8, resume_stop=3, speed_batch=8, speed_steps=8,
                   speed_skip=3, llama_steps=3, memory_shape="default", memory_batch=4, stage_steps=2,
                   stage_batch=4, grpo_new_tokens=8, decode_tokens=16, decode_batch=32, serve_clients=32,
                   serve_requests=1, serve_tokens=8, corpus_copies=1)


# ---------------------------------------------------------------- the report

@dataclass
class Row:
    part: str
    check: str
    status: str                    # pass, fail, measured, skipped: ..., error: ..., timeout
    value: str = ""
    detail: str = ""
    numbers: dict = field(default_factory=dict)


class Report:
    def __init__(self, folder, machine):
        self.folder, self.machine = folder, machine
        self.rows, self.parts = [], {}
        self.started = time.perf_counter()

    def add(self, row):
        self.rows.append(row)
        shown = f" {row.value}" if row.value else ""
        print(f"[{self.elapsed():5.0f} s] {row.part}: {row.check}: {row.status}{shown}", flush=True)
        if row.detail and not row.status.startswith(("pass", "measured")):
            print(f"          {row.detail[-600:]}", flush=True)

    def elapsed(self):
        return time.perf_counter() - self.started

    def part_done(self, name, status, seconds, limit):
        self.parts[name] = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1)}
        self.write()

    def write(self):
        data = {"machine": self.machine, "seconds": round(self.elapsed(), 1), "parts": self.parts,
                "rows": [asdict(row) for row in self.rows]}
        (self.folder / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        (self.folder / "report.md").write_text(self.markdown())

    def markdown(self):
        machine = self.machine
        lines = [f"# GPU check: {machine['device_name']}", "",
                 f"{machine['device']} ({machine['device_name']}), torch {machine['torch']}"
                 f"{', CUDA ' + machine['cuda'] if machine.get('cuda') else ''}, {machine['cpus']} CPUs, load "
                 f"{machine['load_before']}; {machine['started']}; {self.elapsed():.0f} s"
                 f"{' (--tiny)' if machine['tiny'] else ''}.", "",
                 "| part | status | seconds (limit) |", "| --- | --- | --- |"]
        lines += [f"| {name} | {part['status']} | {part['seconds']:.0f} ({part['limit_s']:.0f}) |"
                  for name, part in self.parts.items()]
        lines += ["", "| part | check | status | value | detail |", "| --- | --- | --- | --- | --- |"]
        for row in self.rows:
            cells = [row.part, row.check, row.status, row.value, row.detail.replace("\n", " ")[:300]]
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
        return "\n".join(lines) + "\n"


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise PartTimeout in this (the main) thread after `seconds`, whatever it is waiting on."""
    def expire(signum, frame):
        raise PartTimeout(f"stopped at its time limit of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- running train.py

@dataclass
class Run:
    name: str
    code: int
    output: str
    folder: Path
    seconds: float

    @property
    def ok(self):
        return self.code == 0

    def metrics(self):
        path = self.folder / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def step_rows(self):
        return [row for row in self.metrics() if "loss" in row and "val_loss" not in row]

    def failure(self):
        """The end of the output, where the error is."""
        return f"exit code {self.code}: " + " ".join(self.output.strip().splitlines()[-6:])


class OutputTee(io.TextIOBase):
    """An in-process run's stdout/stderr: kept, and `on_text` sees each piece as it is written."""

    def __init__(self, on_text=None):
        self.parts, self.on_text = [], on_text

    def write(self, text):
        self.parts.append(text)
        if self.on_text:
            self.on_text(text)
        return len(text)

    def text(self):
        return "".join(self.parts)


class Check:
    """The context every part shares: the device, sizes, folders, the report, the base model."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tiny = args.tiny
        self.settings = Settings.tiny() if args.tiny else Settings()
        self.shapes = TINY_SHAPES if args.tiny else SHAPES
        self.folder = Path(args.output_dir).resolve()
        self.runs = self.folder / "runs"
        self.logs = self.folder / "logs"
        for folder in (self.runs, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MINIMIND_CACHE": str(self.folder / "token_cache")}
        if self.tiny:
            self.env["OMP_NUM_THREADS"] = "1"  # tiny models run fastest, and steadiest, on one thread
        os.environ["MINIMIND_CACHE"] = self.env["MINIMIND_CACHE"]
        self.children = []
        self.report = None
        self.base = None          # a small pretrained model (final/ of the float32 curve run)

    def flags(self, shape="default", **extra):
        """train.py flags: a shape (None: the pretrained model's), this device, no plots or samples,
        a log row per step, and `extra` (name=value)."""
        flags = [f"--{name}={value}" for name, value in self.shapes[shape].items()] if shape else []
        flags += [f"--device={self.args.device}", "--report_to=none", "--sample_tokens=0", "--log_interval=1"]
        return flags + [f"--{name}={value}" for name, value in extra.items()]

    def shape_label(self, shape):
        values = self.shapes[shape]
        return f"hidden {values['hidden_size']} x {values['num_layers']} layers"

    def train(self, name, flags, stop_after_step=None, isolated=False, launcher=None, output_dir=None):
        """`python train.py FLAGS --output_dir runs/NAME` (or `output_dir`); returns a Run.
        stop_after_step=k: Ctrl-C (SIGINT) once step k is logged, as a user would stop it.
        In-process with --tiny unless `isolated` (a memory peak needs its own process) or a
        `launcher` (torchrun) is given."""
        folder = Path(output_dir or self.runs / name)
        flags = [*flags, f"--output_dir={folder}"]
        start = time.perf_counter()
        if self.tiny and not isolated and launcher is None:
            code, output = self.train_in_process(flags, stop_after_step)
        else:
            command = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *flags]
            code, output = self.subprocess(command, stop_after_step)
        log = self.logs / f"{name}.log"
        log.write_text((log.read_text() + "\n" if log.exists() else "") + output)
        return Run(name, code, output, folder, time.perf_counter() - start)

    def train_in_process(self, flags, stop_after_step):
        marker = f"Step [{stop_after_step}/" if stop_after_step else None
        sent = []

        def watch(text):
            if marker and not sent and marker in text:
                sent.append(True)
                signal.raise_signal(signal.SIGINT)  # the trainer's handler: a checkpoint after this step

        tee, argv = OutputTee(watch), sys.argv
        sys.argv = ["train.py", *flags]
        try:
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except (PartTimeout, KeyboardInterrupt):
            raise
        except BaseException as error:  # a crash is a finding to report, not the end of the check
            import traceback
            tee.write("".join(traceback.format_exception(error)))
            code = 1
        finally:
            sys.argv = argv
        return code, tee.text()

    def subprocess(self, command, stop_after_step=None):
        marker = f"Step [{stop_after_step}/" if stop_after_step else None
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=self.env, cwd=ROOT, start_new_session=True)
        self.children.append(process)
        lines = []
        try:
            for line in process.stdout:
                lines.append(line)
                if marker and marker in line:
                    process.send_signal(signal.SIGINT)
                    marker = None
            return process.wait(), "".join(lines)
        finally:
            self.stop_child(process)

    def stop_child(self, process):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process in self.children:
            self.children.remove(process)

    def stop_children(self):
        for process in list(self.children):
            self.stop_child(process)

    def row(self, part, check, status, value="", detail="", **numbers):
        self.report.add(Row(part, check, status, value, detail, numbers))

    def run_row(self, part, check, run, value=""):
        """A row for a run that must succeed: pass with `value`, or the error it ended with."""
        self.row(part, check, "pass" if run.ok else "error: the run failed", value if run.ok else "",
                 f"{run.seconds:.1f} s; log: logs/{run.name}.log" if run.ok else run.failure(), seconds=run.seconds)

    def ensure_base(self):
        """A small pretrained model for the parts that start from one: the float32 curve run's, or
        one trained now when that part did not run."""
        if self.base is None or not (self.base / "model.safetensors").exists():
            run = self.train("base", self.flags(max_steps=10, dropout=0, val_fraction=0, batch_size=8,
                                                learning_rate=1e-3, data=DATA / "pretrain.jsonl"))
            if not run.ok:
                raise RuntimeError(f"could not train the base model: {run.failure()}")
            self.base = run.folder / "final"
        return self.base

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------- what the check imports from minimind
# (in one place: when the library's modules move, this is what changes)

def library():
    from minimind import MiniMindConfig, MiniMindForCausalLM, load_model
    from minimind.inference.decoding import generate
    return MiniMindConfig, MiniMindForCausalLM, load_model, generate


# ---------------------------------------------------------------- part 1: correctness

FIXTURE_MODELS = [("MiniMind2 dense", "minimind2", "dense_tiny", "dense_tiny"),
                  ("MiniMind2 MoE", "minimind2", "moe_tiny", "moe_tiny"),
                  ("MiniMind-3 dense", "minimind3", "dense3_tiny", "dense3_tiny"),
                  ("MiniMind-3 MoE", "minimind3", "moe3_tiny", "moe3_tiny")]


def fixture(family, name, weights):
    MiniMindConfig, _, load_model, _ = library()
    folder = FIXTURES / family
    config = MiniMindConfig(**json.loads((folder / f"{name}_config.json").read_text()))
    return load_model(folder / f"{weights}_fp16.pth", config=config), torch.load(
        folder / f"{name}_expected.pt", weights_only=True)


def part_correctness(check):
    logits_rows(check)
    decode_rows(check)
    curve_rows(check)
    resume_rows(check)


@torch.no_grad()
def logits_rows(check):
    """Logits on the device against the original code's (fixtures) and against the CPU: the
    fixtures' tiny models, then a random model of each family's default shape (8 layers deep)."""
    device = check.device
    for label, family, name, weights in FIXTURE_MODELS:
        model, expected = fixture(family, name, weights)
        ids, columns = expected["input_ids"], expected["vocab_columns"]
        cpu = model(ids).logits
        on_device = model.to(device)(ids.to(device)).logits.cpu()
        original = (on_device[..., columns] - expected["logits"]).abs().max().item()
        against_cpu = (on_device - cpu).abs().max().item()
        worst = max(original, against_cpu)
        where = f"{device.type} vs the original code (float32)" + (" and vs the CPU" if check.cuda else "")
        check.row("correctness", f"logits, {label}: {where}", "pass" if worst <= LOGIT_TOLERANCE else "fail",
                  f"{worst:.1e} (max abs, tolerance {LOGIT_TOLERANCE:g})",
                  f"vs original {original:.1e}" + (f", vs CPU {against_cpu:.1e}" if check.cuda else ""),
                  vs_original=original, vs_cpu=against_cpu)
    MiniMindConfig, MiniMindForCausalLM, _, _ = library()
    for family in ("minimind2", "minimind3"):
        label = f"logits, {family} default shape (random weights): the GPU vs the CPU, float32"
        if not check.cuda:
            check.row("correctness", label, "skipped: needs CUDA")
            continue
        torch.manual_seed(0)
        model = MiniMindForCausalLM(MiniMindConfig(model_family=family)).eval()
        ids = torch.randint(3, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(1))
        cpu = model(ids).logits
        on_device = model.to(device)(ids.to(device)).logits.cpu()
        worst = (on_device - cpu).abs().max().item()
        scale = cpu.abs().max().item()
        check.row("correctness", label, "pass" if worst <= LOGIT_TOLERANCE else "fail",
                  f"{worst:.1e} (max abs; logits up to {scale:.2f})", max_abs=worst)
        del model


@torch.no_grad()
def decode_rows(check):
    """The KV-cache path against full forwards: one token at a time after a prefill, and a
    left-padded batch (the padding-mask attention path) against each row alone."""
    device = check.device
    for label, family, name, weights in FIXTURE_MODELS[::2]:
        model, expected = fixture(family, name, weights)
        model = model.to(device)
        ids, prefill, columns = expected["input_ids"].to(device), int(expected["decode_prefill"]), expected["vocab_columns"]
        out = model(ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits[:, -1]], out.cache
        for position in range(prefill, ids.shape[1] - 1):
            out = model(ids[:, position:position + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.cache
        cached = torch.stack(steps, dim=1).cpu()
        full = model(ids).logits[:, prefill - 1:-1].cpu()
        against_full = (cached - full).abs().max().item()
        original = (cached[..., columns] - expected["decode_logits"][:, :cached.shape[1]]).abs().max().item()
        worst = max(against_full, original)
        check.row("correctness", f"KV-cache decode, {label}: vs a full forward and vs the original's cache",
                  "pass" if worst <= LOGIT_TOLERANCE else "fail", f"{worst:.1e} (max abs)",
                  f"vs full forward {against_full:.1e}, vs original {original:.1e}", vs_full=against_full,
                  vs_original=original)
        # row 1 left-padded by 5 tokens, in one batch with row 0 at full length
        pad = 5
        padded = torch.cat([torch.zeros(1, pad, dtype=torch.long, device=device), ids[1:, :-pad]], dim=1)
        batch, mask = torch.cat([ids[:1], padded]), torch.ones(2, ids.shape[1], dtype=torch.long, device=device)
        mask[1, :pad] = 0
        together = model(batch, attention_mask=mask).logits[1, pad:].cpu()
        alone = model(ids[1:, :-pad]).logits[0].cpu()
        _, _, _, generate = library()
        prompts = [ids[0, :12].tolist(), ids[1, :7].tolist()]
        batched = generate(model, prompts, max_new_tokens=8, eos_token_id=[]).token_ids
        single = [generate(model, [prompt], max_new_tokens=8, eos_token_id=[]).token_ids[0] for prompt in prompts]
        worst = (together - alone).abs().max().item()
        same = batched == single
        check.row("correctness", f"left-padded batch, {label}: logits and greedy decode vs each row alone",
                  "pass" if worst <= LOGIT_TOLERANCE and same else "fail",
                  f"{worst:.1e} (max abs); same greedy tokens: {same}", max_abs=worst, same_tokens=same)


def curve_rows(check):
    """A bfloat16 run's step losses against float32's (dropout off, same seed and data)."""
    settings = check.settings
    bf16_ok = not check.cuda or torch.cuda.is_bf16_supported(including_emulation=False)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = check.train(f"curve_{dtype}", check.flags(
            dtype=dtype, dropout=0, max_steps=settings.curve_steps, batch_size=settings.curve_batch,
            learning_rate=5e-4, val_fraction=0, data=DATA / "pretrain.jsonl"))
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    if fp32.ok:
        check.base = fp32.folder / "final"
    if not (fp32.ok and bf16.ok):
        bad = fp32 if not fp32.ok else bf16
        check.row("correctness", f"bfloat16 vs float32 losses, {settings.curve_steps} steps", "error: a run failed",
                  detail=bad.failure())
        return
    a = {row["step"]: row["loss"] for row in fp32.step_rows()}
    b = {row["step"]: row["loss"] for row in bf16.step_rows()}
    steps = sorted(set(a) & set(b))
    differences = [abs(b[s] - a[s]) / abs(a[s]) for s in steps]
    mean, worst = statistics.mean(differences), max(differences)
    passed = len(steps) == settings.curve_steps and mean <= CURVE_MEAN_TOLERANCE and worst <= CURVE_MAX_TOLERANCE
    note = "" if bf16_ok else "; this GPU emulates bfloat16"
    check.row("correctness", f"bfloat16 vs float32 losses, first {settings.curve_steps} steps",
              "pass" if passed else "fail",
              f"mean {100 * mean:.3f}%, max {100 * worst:.3f}% (tolerance {100 * CURVE_MEAN_TOLERANCE:g}%, "
              f"{100 * CURVE_MAX_TOLERANCE:g}%)",
              f"loss {a[steps[0]]:.3f} -> {a[steps[-1]]:.3f} (float32), {b[steps[0]]:.3f} -> {b[steps[-1]]:.3f} "
              f"(bfloat16); {fp32.seconds:.0f} s and {bf16.seconds:.0f} s{note}",
              mean=mean, max=worst, float32=[a[s] for s in steps], bfloat16=[b[s] for s in steps])


def weight_difference(path_a, path_b):
    """The largest relative difference ||a - b|| / ||b|| over the tensors of two model files."""
    a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in (path_a, path_b))
    if a.keys() != b.keys():
        return math.inf
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)).item() for k in a)


def resume_rows(check):
    """Interrupted (Ctrl-C after a step, dropout on, the device's default dtype) and resumed, against
    the same run uninterrupted. Where two uninterrupted runs differ (non-deterministic GPU kernels),
    the resumed run may differ as much, and no more than 10x."""
    settings = check.settings
    flags = check.flags(max_steps=settings.resume_steps, batch_size=4 if check.tiny else 8, dropout=0.1,
                        learning_rate=5e-4, val_fraction=0.05, save_steps=0, data=DATA / "pretrain.jsonl")
    label = f"exact resume after Ctrl-C at step {settings.resume_stop} of {settings.resume_steps} (dropout on)"
    whole = check.train("resume_whole", flags)
    cut = check.train("resume_cut", flags, stop_after_step=settings.resume_stop)
    if not whole.ok or cut.code != 128 + signal.SIGINT:
        bad = whole if not whole.ok else cut
        check.row("correctness", label, "error: a run failed", detail=bad.failure())
        return
    resumed = check.train("resume_cut", [*flags, "--resume"], output_dir=cut.folder)
    if not resumed.ok:
        check.row("correctness", label, "error: the resumed run failed", detail=resumed.failure())
        return
    resumed_from = re.search(r"Resuming from .*?step (\d+)", resumed.output)
    difference = weight_difference(cut.folder / "model_final.pth", whole.folder / "model_final.pth")
    noise = 0.0
    if difference > 0:
        again = check.train("resume_whole_again", flags)
        noise = weight_difference(again.folder / "model_final.pth", whole.folder / "model_final.pth") if again.ok \
            else math.inf
    passed = difference == 0 or difference <= 10 * noise
    check.row("correctness", label, "pass" if passed else "fail",
              "identical weights" if difference == 0 else f"{difference:.1e} relative (two whole runs: {noise:.1e})",
              f"resumed from step {resumed_from.group(1) if resumed_from else '?'}; {whole.seconds:.0f} s whole",
              difference=difference, noise=noise)


# ---------------------------------------------------------------- part 2: speed

def peak_tflops(device_name, dtype):
    """The chip's dense tensor-core peak in this dtype (TFLOP/s) from PEAK_TFLOPS, or None: a chip
    not in the table, or one without units for the dtype."""
    for pattern, bf16, fp16 in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return bf16 if dtype == "bfloat16" else fp16 if dtype == "float16" else None
    return None


def matmul_tflops(check, dtype):
    """What this device's matrix units deliver on a large square matmul, TFLOP/s (median of 3)."""
    size, repeats = (1024, 2) if check.tiny else (8192, 10)
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, device=check.device, dtype=torch_dtype)
    b = torch.randn(size, size, device=check.device, dtype=torch_dtype)
    rates = []
    for _ in range(4):
        check.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        check.synchronize()
        rates.append(2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12)
    return statistics.median(rates[1:])


def flops_per_token(parameters, shape):
    """6N for the matmuls (forward and backward) plus causal attention's QK^T and AV: 6 L S d."""
    return 6 * parameters + 6 * shape["num_layers"] * shape["max_seq_len"] * shape["hidden_size"]


def speed_corpus(check):
    """The bundled pretraining corpus repeated, so that one epoch holds every timed step at the
    speed part's batch (no epoch-end validation or checkpoint between them)."""
    path = check.folder / "runs" / "pretrain_repeated.jsonl"
    if not path.exists():
        text = (DATA / "pretrain.jsonl").read_text()
        path.write_text(text * check.settings.corpus_copies)
    return path


def llama_twin(shape, batch, dtype, check):
    """transformers' LlamaForCausalLM of our shape, trained the plain way (model(ids, labels=ids),
    backward, clipping, AdamW) in this process: tokens/s and its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM
    MiniMindConfig, _, _, _ = library()
    ours = MiniMindConfig(hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
                          num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_key_value_heads"])
    config = LlamaConfig(hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
                         num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
                         num_key_value_heads=ours.num_key_value_heads, vocab_size=ours.vocab_size,
                         max_position_embeddings=shape["max_seq_len"], rms_norm_eps=ours.rms_norm_eps,
                         rope_theta=ours.rope_theta, tie_word_embeddings=True, attention_bias=False,
                         mlp_bias=False, hidden_act="silu")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(check.device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, ours.vocab_size, (batch, shape["max_seq_len"]), device=check.device)
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type=check.device.type, dtype=getattr(torch, dtype)))

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(check.settings.llama_steps):
        check.synchronize()
        start = time.perf_counter()
        step()
        check.synchronize()
        times.append(time.perf_counter() - start)
    del model, optimizer
    if check.cuda:
        torch.cuda.empty_cache()
    return batch * shape["max_seq_len"] / statistics.median(times), parameters


def part_speed(check):
    """Each shape's Llama baseline and eager run first, then the compiled runs (the slowest to
    start): when the part's time runs out, what is left is the least needed."""
    settings = check.settings
    dtype = "bfloat16" if check.cuda else "float32"
    name = check.report.machine["device_name"]
    peak = peak_tflops(name, dtype) if check.cuda else None
    measured = matmul_tflops(check, dtype)
    check.row("speed", f"matmul, {dtype}", "measured", f"{measured:.3g} TFLOP/s",
              f"{name}: data-sheet peak {peak} TFLOP/s" if peak else
              f"{name}: peak unknown (not in the table of known chips)" if check.cuda else "CPU", tflops=measured,
              peak=peak)
    if not check.cuda:
        check.row("speed", "bfloat16 autocast speed", "skipped: needs CUDA",
                  detail="on a CPU the speed rows below are float32")
    baselines = {}
    for shape_name in ("default", "104m"):
        baselines[shape_name] = llama_rate, parameters = llama_twin(check.shapes[shape_name], settings.speed_batch,
                                                                    dtype, check)
        check.row("speed", f"{speed_label(check, shape_name, parameters)}: transformers Llama, {dtype}", "measured",
                  f"{llama_rate:,.0f} tokens/s", mfu_text(check, shape_name, parameters, llama_rate, peak, measured),
                  tokens_per_s=llama_rate, parameters=parameters)
        speed_run(check, shape_name, dtype, False, baselines[shape_name], peak, measured)
    for shape_name in ("default", "104m"):
        speed_run(check, shape_name, dtype, True, baselines[shape_name], peak, measured)
    check.row("speed", "the original MiniMind training loop as a baseline", "skipped: not reproduced here",
              detail="transformers' Llama of the same shape is the baseline (bench/train_throughput.py has the "
                     "plain eager loop and a numerics check)")


def speed_label(check, shape_name, parameters):
    shape = check.shapes[shape_name]
    return (f"{check.shape_label(shape_name)} ({parameters / 1e6:.1f}M), batch {check.settings.speed_batch} x "
            f"{shape['max_seq_len']}")


def mfu_text(check, shape_name, parameters, rate, peak, matmul):
    done = rate * flops_per_token(parameters, check.shapes[shape_name])
    chip = f"{done / (peak * 1e12):.2f}" if peak else "unknown"
    return f"MFU {chip} of the chip's peak, {done / (matmul * 1e12):.2f} of the matmul measured here"


def speed_run(check, shape_name, dtype, compiled, baseline, peak, matmul):
    """train.py's tokens/s at this shape: the median over the steps after the warm-up."""
    settings, shape = check.settings, check.shapes[shape_name]
    llama_rate, parameters = baseline
    what = f"{speed_label(check, shape_name, parameters)}: train.py --dtype {dtype}{' --compile' if compiled else ''}"
    if compiled and check.tiny:
        check.row("speed", what, "skipped: --tiny (compiling takes longer than the CPU mode's minute)")
        return
    flags = check.flags(shape_name, dtype=dtype, batch_size=settings.speed_batch, max_steps=settings.speed_steps,
                        dropout=0, val_fraction=0, save_steps=0, save_interval=1000000, data=speed_corpus(check))
    run = check.train(f"speed_{shape_name}{'_compile' if compiled else ''}", flags + (["--compile"] if compiled else []))
    rows = [row for row in run.step_rows() if row["step"] > settings.speed_skip and "tokens_per_s" in row]
    if not run.ok or not rows:
        check.row("speed", what, "error: the run failed", detail=run.failure())
        return
    rate = statistics.median(row["tokens_per_s"] for row in rows)
    ours = re.search(r"parameters: ([\d.]+)M", run.output)
    first_seconds = settings.speed_batch * shape["max_seq_len"] / max(run.step_rows()[0]["tokens_per_s"], 1e-9)
    check.row("speed", what, "measured", f"{rate:,.0f} tokens/s, {rate / llama_rate:.2f}x Llama",
              f"{mfu_text(check, shape_name, parameters, rate, peak, matmul)}; first step {first_seconds:.1f} s; "
              f"{ours.group(1) if ours else '?'}M parameters (Llama {parameters / 1e6:.2f}M); median of steps "
              f"{settings.speed_skip + 1}-{settings.speed_steps}",
              tokens_per_s=rate, ratio_to_llama=rate / llama_rate, first_step_s=first_seconds,
              mfu=rate * flops_per_token(parameters, shape) / (peak * 1e12) if peak else None)


# ---------------------------------------------------------------- part 3: memory

def mib(pattern, text):
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def part_memory(check):
    """The dry run's memory forecast against a real run: on a GPU, at the largest batch the dry run
    says fits; on a CPU, at the dry run's own batch (resident memory)."""
    settings = check.settings
    shape = settings.memory_shape

    def flags(batch, steps):
        return check.flags(shape, batch_size=batch, max_steps=steps, dropout=0, val_fraction=0, save_steps=0,
                           save_interval=1000000, data=speed_corpus(check))

    dry = check.train("memory_dry_run", [*flags(settings.memory_batch, 4), "--dry_run"], isolated=True)
    if not dry.ok:
        check.row("memory", "dry run", "error: the dry run failed", detail=dry.failure())
        return
    batch = settings.memory_batch
    if check.cuda:
        # the dry run's memory model: peak(B) = fixed + per_sample x B, in GPU memory (context included)
        largest = re.search(r"Largest --batch_size that fits: (\d+) \(forecast peak (\d+) MiB of (\d+) MiB: "
                            r"([\d.]+) MiB \+ ([\d.]+) MiB a sample\)", dry.output)
        samples = re.search(r"Data: (\d+) training samples", dry.output)
        if not largest:
            check.row("memory", "largest batch that fits", "error: not in the dry run's report",
                      detail=" ".join(dry.output.splitlines()[-8:]))
            return
        largest_batch, capacity, fixed, per_sample = (float(largest.group(i)) for i in (1, 3, 4, 5))
        batch = int(min(largest_batch, int(samples.group(1)) if samples else largest_batch))
        forecast = fixed + per_sample * batch
        check.row("memory", f"{check.shape_label(shape)}: largest --batch_size that fits (dry run at batch "
                            f"{settings.memory_batch})", "measured", f"{largest_batch:.0f}",
                  f"forecast peak {largest.group(2)} MiB of {capacity:.0f} MiB ({fixed:.0f} MiB + {per_sample:.1f} MiB "
                  f"a sample); measured at batch {batch}" + (" (all the data's samples)" if batch < largest_batch
                                                            else ""),
                  batch=largest_batch, capacity_mib=capacity, fixed_mib=fixed, per_sample_mib=per_sample)
        real = check.train("memory_real", flags(batch, 2), isolated=True)
        measured = mib(r"Peak memory: .*?(\d+) MiB of GPU memory", real.output)
    else:
        check.row("memory", "largest --batch_size that fits the GPU", "skipped: needs CUDA")
        forecast = mib(r"Peak memory: (\d+) MiB resident", dry.output)
        real = check.train("memory_real", flags(batch, 4), isolated=True)
        measured = mib(r"Peak memory: (\d+) MiB resident", real.output)
    label = f"{check.shape_label(shape)}: the dry run's forecast peak vs the real run's, batch {batch}"
    if not real.ok:
        check.row("memory", label, "fail" if "out of memory" in real.output.lower() else "error: the run failed",
                  detail=real.failure())
    elif forecast is None or measured is None:
        check.row("memory", label, "error: a peak is missing from the output",
                  detail=f"forecast {forecast}, measured {measured}")
    else:
        ratio = forecast / measured
        low, high = MEMORY_RATIO_RANGE
        check.row("memory", label, "pass" if low <= ratio <= high else "fail",
                  f"{forecast:.0f} MiB forecast, {measured:.0f} MiB measured: {ratio:.2f}x",
                  f"{low}-{high}x passes", forecast_mib=forecast, measured_mib=measured, ratio=ratio)


# ---------------------------------------------------------------- part 4: stages

def part_stages(check):
    """A few steps of each stage from the base model (distillation: a smaller student learns from it)."""
    settings = check.settings
    base = check.ensure_base()
    split = "eval" if check.tiny else "train"  # the smaller files are tokenized faster
    seq = check.shapes["default"]["max_seq_len"]
    common = dict(max_steps=settings.stage_steps, batch_size=settings.stage_batch, val_fraction=0, save_steps=0,
                  learning_rate=1e-4, max_seq_len=seq)
    student = dict(hidden_size=32 if check.tiny else 256, num_layers=2 if check.tiny else 4, num_heads=4,
                   num_key_value_heads=2)
    runs = {
        "sft": dict(data=DATA / f"sft_{split}.jsonl", pretrained_path=base),
        "lora": dict(data=DATA / f"sft_{split}.jsonl", pretrained_path=base, lora_rank=8),
        "dpo": dict(data=DATA / f"dpo_{split}.jsonl", pretrained_path=base),
        "grpo": dict(data=DATA / f"grpo_{split}.jsonl", pretrained_path=base, stage="grpo", grpo_group_size=4,
                     grpo_max_new_tokens=settings.grpo_new_tokens, batch_size=4, max_steps=2),
        "distillation": dict(data=DATA / f"sft_{split}.jsonl", stage="distill", teacher=base, **student),
    }
    for name, extra in runs.items():
        settings_used = {**common, **extra}
        run = check.train(f"stage_{name}", check.flags(None, **settings_used))
        rows = run.step_rows()
        finite = all(math.isfinite(row["loss"]) for row in rows)
        steps = settings_used["max_steps"]
        label = f"{name}{' (SFT, rank 8)' if name == 'lora' else ''}: {steps} steps"
        if run.ok and (len(rows) != steps or not finite or not (run.folder / "final" / "model.safetensors").exists()):
            check.row("stages", label, "fail", detail=f"{len(rows)} step rows of {steps}, finite losses: {finite}")
            continue
        reward = f", reward {rows[-1]['reward']:.3f}" if rows and "reward" in rows[-1] else ""
        check.run_row("stages", label, run, f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}{reward}"
                      if rows else "")


# ---------------------------------------------------------------- part 5: inference

def part_inference(check):
    decode_speed_rows(check)
    serve_rows(check)


@torch.no_grad()
def decode_speed_rows(check):
    settings = check.settings
    _, _, load_model, generate = library()
    base = check.ensure_base()
    generator = torch.Generator().manual_seed(0)
    for dtype in (("float32", "bfloat16") if check.cuda else ("float32",)):
        model = load_model(base, dtype=getattr(torch, dtype)).to(check.device)
        vocab = model.config.vocab_size
        for batch in (1, settings.decode_batch):
            lengths = [32 - (i % 8) * 3 for i in range(batch)]  # different lengths: left padding, the masked path
            prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
            generate(model, prompts, max_new_tokens=4, eos_token_id=[])  # warm-up
            check.synchronize()
            start = time.perf_counter()
            out = generate(model, prompts, max_new_tokens=settings.decode_tokens, eos_token_id=[])
            check.synchronize()
            seconds = time.perf_counter() - start
            tokens = sum(len(ids) for ids in out.token_ids)
            check.row("inference", f"decode, batch {batch}, {dtype}, {settings.decode_tokens} new tokens", "measured",
                      f"{tokens / seconds:,.0f} tokens/s", f"{seconds:.2f} s; prompts of {min(lengths)}-{max(lengths)} "
                      f"tokens", tokens_per_s=tokens / seconds)
        del model
    if check.cuda:
        torch.cuda.empty_cache()


def minimind_command():
    """The `minimind` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "minimind"
    found = str(beside) if beside.exists() else shutil.which("minimind")
    if found is None:
        raise RuntimeError("the `minimind` command is not installed beside this Python (pip install -e .)")
    return [found]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat_request(url, model_name, prompt, max_tokens):
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load_level(url, model_name, clients, requests, max_tokens):
    """`clients` threads, each sending `requests` chat requests one after another: tokens/s over the
    level's wall time, latencies, errors."""
    prompts = [f"Tell me about the river number {i} and the town beside it." for i in range(clients * requests)]

    def client(index):
        results = []
        for prompt in prompts[index * requests:(index + 1) * requests]:
            try:
                results.append(chat_request(url, model_name, prompt, max_tokens))
            except Exception as error:  # noqa: BLE001 - counted and reported, the others go on
                results.append(error)
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - start
    done = [r for r in results if not isinstance(r, Exception)]
    errors = [r for r in results if isinstance(r, Exception)]
    latencies = sorted(seconds for seconds, _ in done)
    tokens = sum(count for _, count in done)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else math.nan
    return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies) if latencies else math.nan,
            "p95_s": p95, "errors": len(errors), "first_error": repr(errors[0]) if errors else "", "tokens": tokens}


def serve_rows(check):
    settings = check.settings
    base = check.ensure_base()
    port = free_port()
    dtype = "bfloat16" if check.cuda else "float32"
    command = minimind_command() + ["serve", "--model", str(base), "--device", check.args.device, "--dtype", dtype,
                                    "--port", str(port), "--max_batch_size", str(settings.serve_clients)]
    log = open(check.logs / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=check.env, cwd=ROOT,
                               start_new_session=True)
    check.children.append(process)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}: "
                                   + " ".join((check.logs / "serve.log").read_text().splitlines()[-5:]))
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
                    model_name = json.load(response)["data"][0]["id"]
                    break
            except OSError:
                time.sleep(0.3)
        levels = {}
        for clients in (1, settings.serve_clients):
            levels[clients] = result = load_level(url, model_name, clients, settings.serve_requests,
                                                  settings.serve_tokens)
            ratio = f", {result['tokens_per_s'] / levels[1]['tokens_per_s']:.1f}x one client" if clients > 1 else ""
            check.row("inference", f"minimind serve, {clients} concurrent client{'s' if clients > 1 else ''} x "
                                   f"{settings.serve_requests} requests, {settings.serve_tokens} tokens, {dtype}",
                      "fail" if result["errors"] else "measured",
                      f"{result['tokens_per_s']:,.0f} tokens/s{ratio}",
                      f"latency p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s; errors {result['errors']} "
                      f"{result['first_error']}", **result)
    finally:
        check.stop_child(process)
        log.close()


# ---------------------------------------------------------------- part 6: distributed

def part_distributed(check):
    """torchrun with one process joins a process group (NCCL on a GPU) and trains through the same
    wrappers as N processes: DistributedDataParallel, FSDP2, FSDP2 with LoRA adapters."""
    base = check.ensure_base()
    variants = {"ddp": ("data parallel (DDP)", "default", {}),
                "fsdp": ("--fsdp", "default", {"fsdp": 1}),
                "fsdp_lora": ("--fsdp --lora_rank 8", None, {"fsdp": 1, "lora_rank": 8, "pretrained_path": base})}
    if not check.cuda:
        for label, _, _ in variants.values():
            check.row("distributed", f"torchrun, 1 process, NCCL: {label}", "skipped: needs CUDA",
                      detail="gloo on a CPU: tests/test_distributed.py")
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    for name, (label, shape, extra) in variants.items():
        flags = check.flags(shape, max_steps=4, batch_size=8, save_steps=2, val_fraction=0.05,
                            data=DATA / "sft_train.jsonl", **extra)
        run = check.train(f"torchrun_{name}", flags, launcher=launcher)
        joined = re.search(r"Ranks: 1 \((.*?), (\w+)\)", run.output)
        label = f"torchrun, 1 process, NCCL: {label}"
        if run.ok and not (joined and joined.group(2) == "nccl"):
            check.row("distributed", label, "fail", detail="the run did not join an NCCL process group: "
                                                         + (joined.group(0) if joined else "no 'Ranks:' line"))
            continue
        check.run_row("distributed", label, run, joined.group(1) if joined else "")


# ---------------------------------------------------------------- the run

PARTS = {  # name -> (function, seconds it may take on a GPU, on --tiny)
    "correctness": (part_correctness, 100, 60),
    "speed": (part_speed, 170, 60),
    "memory": (part_memory, 50, 60),
    "stages": (part_stages, 60, 60),
    "inference": (part_inference, 40, 60),
    "distributed": (part_distributed, 40, 30),
}


def machine(args):
    device = torch.device(args.device)
    info = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, cuda=torch.version.cuda, memory_mib=properties.total_memory // 2 ** 20,
                    capability=f"{properties.major}.{properties.minor}",
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu (with --tiny: the test of this script)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: every part in seconds")
    parser.add_argument("--output_dir", default="gpu_check", help="where report.md, report.json and logs/ go")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (parts left when it "
                                                                  "is spent are reported as skipped)")
    parser.add_argument("--only", default=None, help=f"comma-separated parts to run [all: {','.join(PARTS)}]")
    parser.add_argument("--keep_runs", action="store_true", help="keep runs/ (models, checkpoints) at the end")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",")] if args.only else list(PARTS)
    unknown = [name for name in args.only if name not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; the parts: {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: run on a GPU machine, or test the script with --device cpu --tiny")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)
    check = Check(args)
    check.report = report = Report(check.folder, machine(args))
    print(f"GPU check on {report.machine['device_name']} ({args.device}); budget {args.budget:.0f} s; "
          f"report in {check.folder}", flush=True)
    try:
        for name, (function, gpu_limit, tiny_limit) in PARTS.items():
            own_limit = tiny_limit if args.tiny else gpu_limit
            left = args.budget - report.elapsed()
            limit = min(own_limit, left)
            if name not in args.only:
                continue
            if left < min(5, own_limit):
                report.add(Row(name, "the whole part", "skipped: the check's --budget is spent"))
                report.part_done(name, "skipped", 0, 0)
                continue
            print(f"[{report.elapsed():5.0f} s] {name} (at most {limit:.0f} s)", flush=True)
            start, before = time.perf_counter(), len(report.rows)
            try:
                with time_limit(limit):
                    function(check)
                statuses = [row.status for row in report.rows[before:]]
                status = ("fail" if any(s.startswith(("fail", "error", "timeout")) for s in statuses)
                          else "pass" if any(s == "pass" for s in statuses) else "measured"
                          if any(s == "measured" for s in statuses) else "skipped")
            except PartTimeout as error:
                report.add(Row(name, "the rest of the part", "timeout", detail=str(error)))
                status = "timeout"
            except Exception as error:  # noqa: BLE001 - report it and go on to the next part
                import traceback
                report.add(Row(name, "the part", f"error: {type(error).__name__}",
                               detail=f"{error}; {traceback.format_exc()[-800:]}"))
                status = "error"
            finally:
                check.stop_children()
                if check.cuda:
                    torch.cuda.empty_cache()
            report.part_done(name, status, time.perf_counter() - start, limit)
    finally:
        check.stop_children()
        report.machine["load_after"] = round(os.getloadavg()[0], 2)
        report.write()
        if not args.keep_runs:
            shutil.rmtree(check.runs, ignore_errors=True)
    failed = [name for name, part in report.parts.items() if part["status"] in ("fail", "error", "timeout")]
    print(f"Done in {report.elapsed():.0f} s: {check.folder / 'report.md'}"
          + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
