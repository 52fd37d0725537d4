"""What a training run tells its user: the banner, log lines, metrics.jsonl, TensorBoard, loss.png,
and the memory it used."""
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write
from .output_dir import METRICS_NAME


class MetricsLog:
    """metrics.jsonl (one row per log step and per validation), and TensorBoard when available."""

    def __init__(self, output_dir, report_to, enabled=True):
        self.path = Path(output_dir) / METRICS_NAME
        self.rows = 0  # rows in the file, recorded in each checkpoint
        self.enabled = enabled  # False on the ranks other than 0: they count rows but write nothing
        self.tensorboard = None
        if report_to in ("auto", "tensorboard") and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                if report_to == "tensorboard":
                    raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None

    def start_afresh(self):
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, row):
        self.rows += 1
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def truncate(self, global_step, rows=None):
        """On resume, drop rows written after the checkpoint, so the log has no repeats.

        `rows` is how many rows the log had when the checkpoint was written (a validation at the
        checkpoint's own step may have come after it); without it, rows are kept by step."""
        kept = []
        if not self.enabled:
            self.rows = rows if rows is not None else 0
            return
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if rows is not None and len(kept) == rows:
                    break
                try:
                    if json.loads(line).get("step", 0) <= global_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a row cut by the kill
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(row + "\n" for row in kept)))
        self.rows = len(kept)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_losses(metrics_path, png_path):
    """loss.png: train loss per log step and validation loss, from metrics.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not Path(metrics_path).exists():  # nothing was logged (a dry run without validation)
        return None
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return png_path


def describe_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == total:
        return f"parameters: {total / 1e6:.2f}M"
    return f"parameters: {total / 1e6:.2f}M, trainable: {trainable / 1e6:.3f}M ({100 * trainable / total:.2f}%)"


def print_banner(config, model, stage, device, dtype):
    """The seed's banner: the run's configuration, one `name: value` a line."""
    line = "=" * 50
    print(line)
    print("MiniMind training configuration:")
    print(line)
    model_config, data, optim = model.config, config.data, config.optim
    shown = {
        "stage": stage, "model_family": model_config.model_family, "hidden_size": model_config.hidden_size, "num_layers": model_config.num_hidden_layers,
        "num_heads": model_config.num_attention_heads, "num_key_value_heads": model_config.num_key_value_heads,
        "vocab_size": model_config.vocab_size, "max_seq_len": data.max_seq_len, "dropout": model_config.dropout,
        "use_moe": int(model_config.use_moe), "epochs": optim.epochs, "batch_size": optim.batch_size,
        "accumulation_steps": optim.accumulation_steps, "learning_rate": optim.learning_rate,
        "min_lr": optim.min_lr, "warmup_steps": optim.warmup_steps, "weight_decay": optim.weight_decay,
        "grad_clip": optim.grad_clip, "dtype": str(dtype).replace("torch.", ""), "seed": optim.seed,
        "data": ", ".join(data.data), "pretrained_path": config.model.pretrained_path or "(none)",
        "output_dir": config.run.output_dir,
    }
    stage_settings = getattr(config, stage, None)  # the stage's own flags: dpo_beta, grpo_*, teacher ...
    if is_dataclass(stage_settings):
        shown.update(asdict(stage_settings))
    for key, value in shown.items():
        print(f"{key}: {value}")
    print(line)
    print(f"Device: {device}")
    print(f"Model {describe_parameters(model)}")


def process_memory_mib(field):
    """This process's memory from /proc/self/status in MiB: VmRSS (resident now) or VmHWM (the most
    resident so far; writing "5" to /proc/self/clear_refs resets it). None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_memory(device):
    """The run's peak memory as the system counts it: the most resident memory (VmHWM, Linux), and
    what the training GPU held at most (devices.GpuMemory), or an Apple GPU's driver at the end.
    Empty where none is known."""
    from ..devices import GpuMemory
    parts = []
    resident = process_memory_mib("VmHWM")
    if resident is not None:
        parts.append(f"{resident:.0f} MiB resident")
    if device.type == "cuda":
        parts.append(GpuMemory.measure(device).describe())
    elif device.type == "mps":
        parts.append(f"{torch.mps.driver_allocated_memory() / 2 ** 20:.0f} MiB held by the Metal driver at the end")
    return ", ".join(parts)
