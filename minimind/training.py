"""The training recipe: one loop for pretraining, SFT and DPO, with or without LoRA.

Reads top to bottom: flags -> data -> model -> optimizer and schedule -> the loop -> outputs.
Stages differ only in their dataset and their loss (`stage_loss`); everything else (mixed
precision, accumulation, clipping, checkpoints, resume, logging) is shared.

`python train.py` and `minimind train` both run `main`.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from .checkpoint import atomic_write, load_config, load_model, save_state_dict
from .config import MiniMindConfig
from .errors import UserError
from .model import MiniMindForCausalLM
from .training_step import model_loss


BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"
CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "run_config.yaml"
METRICS_NAME = "metrics.jsonl"

# Architecture flags: None means "not given" (then the checkpoint's value, or the seed's default).
ARCHITECTURE_DEFAULTS = {
    "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 6400, "dropout": 0.1, "use_moe": 0,
}
FLAG_TO_CONFIG = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "vocab_size": "vocab_size", "dropout": "dropout", "use_moe": "use_moe",
}


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; flags whose default depends on other flags say so in [brackets]."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a MiniMind model: pretraining, SFT or DPO, from scratch or from weights.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model (default: the seed's shape, or the checkpoint's when --pretrained_path is given)")
    g.add_argument("--hidden_size", type=int, default=None, help="hidden dimension [512]")
    g.add_argument("--num_layers", type=int, default=None, help="number of transformer layers [8]")
    g.add_argument("--num_heads", type=int, default=None, help="number of attention (query) heads [8]")
    g.add_argument("--num_key_value_heads", type=int, default=None, help="key/value heads for grouped-query attention [2]")
    g.add_argument("--vocab_size", type=int, default=None, help="vocabulary size [6400]")
    g.add_argument("--max_seq_len", type=int, default=512, help="training sequence length in tokens")
    g.add_argument("--dropout", type=float, default=None, help="dropout rate [0.1]")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="mixture-of-experts feed-forward [0]")
    g.add_argument("--attention_dropout", type=float, default=0.0,
                   help="dropout on attention probabilities; the original applies --dropout there too, but any "
                        "value > 0 takes attention off the fused kernel and halves CPU training speed")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None,
                   help="training files or globs (.jsonl/.json/.txt) [the bundled demo pretraining corpus]")
    g.add_argument("--eval_data", nargs="+", default=None, help="validation files [a held-out --val_fraction of --data]")
    g.add_argument("--val_fraction", type=float, default=0.05, help="share of the training data held out when no --eval_data")
    g.add_argument("--stage", choices=["pretrain", "sft", "dpo"], default=None, help="training stage [from the data's format]")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory [the bundled MiniMind tokenizer]")
    g.add_argument("--skip_bad_records", action="store_true", help="skip malformed records instead of stopping [off]")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    g.add_argument("--batch_size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine decay [learning_rate / 10]")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps [2%% of the run]")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in total [no limit]")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="autocast precision; auto = bfloat16 on a GPU that supports it, float32 on CPU")
    g.add_argument("--seed", type=int, default=42, help="seeds initialisation, data order and dropout")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="keep only each block's input for backward and recompute the rest there: ~1/3 more compute "
                        "for a fraction of the activation memory (docs/benchmarks.md) [off]")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--pretrained_path", default="", help="start from weights: an original .pth, our checkpoint, or a HF-style directory")
    g.add_argument("--dpo_beta", type=float, default=0.1, help="DPO temperature beta")
    g.add_argument("--lora_rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights (0 = off)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scaling alpha [2 x rank]")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    g.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names that get adapters")
    g.add_argument("--lora_special_tokens", type=int, default=1, choices=[0, 1],
                   help="with LoRA, also train the embedding rows of <|endoftext|>, <|im_start|>, <|im_end|> "
                        "(a base pretrained on plain text has never seen the chat tokens)")
    g = p.add_argument_group("outputs and checkpoints")
    g.add_argument("--device", default="cuda:0", help="falls back to cpu when CUDA is absent")
    g.add_argument("--output_dir", default="./output", help="where models, checkpoints and logs go")
    g.add_argument("--log_interval", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--save_interval", type=int, default=1, help="write model_epoch_N.pth every N epochs")
    g.add_argument("--save_steps", type=int, default=100, help="write a resumable checkpoint every N optimizer steps (0 = only at epoch ends)")
    g.add_argument("--eval_interval", type=int, default=0, help="validate every N optimizer steps (0 = at the start and at epoch ends)")
    g.add_argument("--resume", action="store_true", help=f"continue from {CHECKPOINT_NAME} in --output_dir [off]")
    g.add_argument("--report_to", choices=["auto", "tensorboard", "none"], default="auto",
                   help="auto = TensorBoard when the tensorboard package is installed")
    g.add_argument("--compile", action="store_true", help="torch.compile the decoder stack: on CPU at the seed's shape +11-23%% tokens/s after a 30-70 s compile, so it pays off after ~200 steps (docs/benchmarks.md) [off]")
    g.add_argument("--sample_tokens", type=int, default=48, help="tokens of the sample generation printed at the end (0 = none)")
    p.add_argument("--config", default=None, help="a YAML or JSON file of flag values; flags on the command line win [none]")
    return p


def read_config_file(path, parser):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot parse ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}; see python train.py --help")
    return values


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config_file(args.config, parser))
        args = parser.parse_args(argv)
    for name in ("batch_size", "epochs", "accumulation_steps", "max_seq_len", "log_interval", "save_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1) (got {args.val_fraction})")
    return args


def save_run_config(args, path):
    """Every flag of the run; `python train.py --config PATH` reproduces it."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in ("config", "resume")}
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(values, sort_keys=True, allow_unicode=True)))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def resolve_data(args):
    from .data import detect_stage, expand_paths
    if args.data is None:
        args.data = [str(BUNDLED_DATA / "pretrain.jsonl")]
    paths = expand_paths(args.data)
    stage = detect_stage(paths)
    if args.stage is None:
        args.stage = stage
    elif args.stage != stage:
        raise UserError(f"--stage {args.stage} does not match the data: {paths[0]} holds {stage} records")
    eval_paths = expand_paths(args.eval_data) if args.eval_data else None
    return paths, eval_paths


def build_dataset(stage, paths, tokenizer, args):
    from .data import DPODataset, PretrainDataset, SFTDataset
    if stage == "pretrain":
        return PretrainDataset(paths, tokenizer, args.max_seq_len)
    cls = SFTDataset if stage == "sft" else DPODataset
    return cls(paths, tokenizer, args.max_seq_len, skip_bad_records=args.skip_bad_records)


class Subset(torch.utils.data.Dataset):
    """A view on some items of a dataset, keeping their lengths for length-grouped batching."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        lengths = getattr(dataset, "lengths", None)
        self.lengths = [lengths[i] for i in self.indices] if lengths is not None else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def split_validation(dataset, fraction, seed):
    """Hold out a seeded random `fraction` of the items (at least one when fraction > 0)."""
    n = len(dataset)
    count = min(max(1, round(n * fraction)), n - 1) if fraction > 0 and n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    held_out = set(order[:count].tolist())
    train = [i for i in range(n) if i not in held_out]
    return Subset(dataset, train), (Subset(dataset, sorted(held_out)) if count else None)


def epoch_batches(dataset, args, epoch):
    """The micro-batches of one epoch, a deterministic function of (seed, epoch): resuming skips
    the ones already done and sees exactly the same order."""
    from .data import batch_indices
    lengths = getattr(dataset, "lengths", None)
    return batch_indices(lengths if lengths is not None else [1] * len(dataset), args.batch_size, args.seed, epoch,
                         shuffle=True, group_by_length=lengths is not None)


def load_batch(dataset, indices, device):
    from .data import collate
    batch = collate([dataset[i] for i in indices])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def iterate_batches(dataset, batch_lists, num_workers, device):
    """Collated batches in the given order; with num_workers, prepared by worker processes."""
    if num_workers == 0:
        for indices in batch_lists:
            yield load_batch(dataset, indices, device)
        return
    from .data import collate
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_lists, collate_fn=collate,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def resolve_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available: training on the CPU instead of {name}.")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try cpu or cuda:0)") from None


def resolve_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def build_model(args, tokenizer_vocab):
    """A fresh model from the flags, or the --pretrained_path weights (shape from the checkpoint,
    overridden only by the architecture flags actually given)."""
    given = {FLAG_TO_CONFIG[k]: getattr(args, k) for k in FLAG_TO_CONFIG if getattr(args, k) is not None}
    # DPO compares log-probabilities of two answers: dropout noise would blur them
    default_dropout = 0.0 if args.stage == "dpo" else ARCHITECTURE_DEFAULTS["dropout"]
    if "use_moe" in given:
        given["use_moe"] = bool(given["use_moe"])
    if args.pretrained_path:
        path = Path(args.pretrained_path)
        config = load_config(path, **given) if path.exists() else None
        model = load_model(path, config=config)
        if args.dropout is None:
            model.config.dropout = default_dropout
        model.config.attention_dropout = args.attention_dropout
        model = rebuild_with_config(model)  # modules read dropout rates when they are built
    else:
        fields = {FLAG_TO_CONFIG[k]: v for k, v in ARCHITECTURE_DEFAULTS.items()}
        fields["dropout"] = default_dropout
        fields["attention_dropout"] = args.attention_dropout
        fields.update(given)
        fields["use_moe"] = bool(fields["use_moe"])
        try:
            model = MiniMindForCausalLM(MiniMindConfig(**fields))
        except ValueError as error:
            raise UserError(str(error)) from None
    if tokenizer_vocab > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is {model.config.vocab_size}; "
                        f"pass --vocab_size {tokenizer_vocab} or a matching --tokenizer")
    return model


def rebuild_with_config(model):
    """A model whose config changed in a field that modules read at build time (dropout)."""
    fresh = MiniMindForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def describe_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == total:
        return f"parameters: {total / 1e6:.2f}M"
    return f"parameters: {total / 1e6:.2f}M, trainable: {trainable / 1e6:.3f}M ({100 * trainable / total:.2f}%)"


# ---------------------------------------------------------------------------------------------
# Loss, per stage
# ---------------------------------------------------------------------------------------------

def stage_loss(model, batch, stage, args, reference=None):
    """The quantity to minimise for one micro-batch, and the numbers to log about it.

    pretrain / sft: next-token cross-entropy over the labelled tokens (all tokens for pretraining,
    the assistant's for SFT) plus the MoE load-balancing loss.
    dpo: the sigmoid DPO loss on summed response log-probabilities (see minimind.dpo).
    """
    if stage == "dpo":
        from .dpo import dpo_step_loss
        return dpo_step_loss(model, batch, args.dpo_beta, reference)
    # Batches are right-padded and attention is causal, so no real token ever sees a pad: the plain
    # causal path (no mask) gives the same result, faster. Pads carry label -100.
    # model_loss is the fast path: the same loss as model(ids, labels=...).loss without ever
    # holding the full (tokens x vocabulary) logits (see minimind/training_step.py), with or
    # without LoRA adapters.
    loss, aux_loss = model_loss(model, batch["input_ids"], batch["labels"])
    return loss + aux_loss, {"loss": loss.detach()}


@torch.no_grad()
def validate(model, dataset, args, device, autocast, reference=None):
    """Token-weighted mean loss over the validation set (and perplexity), in eval mode."""
    if dataset is None:
        return None
    was_training = model.training
    model.eval()
    total, count, extra = 0.0, 0, {}
    for indices in epoch_batches(dataset, args, epoch=0):
        batch = load_batch(dataset, indices, device)
        with autocast():
            loss, metrics = stage_loss(model, batch, args.stage, args, reference)
        tokens = int((batch["labels"][:, 1:] != -100).sum()) if args.stage != "dpo" else len(indices)
        total += float(metrics["loss"]) * tokens
        count += tokens
        for k, v in metrics.items():
            if k != "loss":
                extra[k] = extra.get(k, 0.0) + float(v) * tokens
    model.train(was_training)
    result = {"val_loss": total / max(count, 1)}
    if args.stage == "dpo":
        result.update({f"val_{k}": v / max(count, 1) for k, v in extra.items()})
    else:
        result["val_ppl"] = math.exp(min(result["val_loss"], 50))
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def rng_state():
    # numpy's key array is stored as a tensor so the checkpoint loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model):
    """What a checkpoint must hold of the model: all weights, or only the adapters under LoRA."""
    if getattr(model, "peft_config", None):
        from .lora import adapter_state_dict
        return adapter_state_dict(model)
    return model.state_dict()


def save_checkpoint(path, model, optimizer, scheduler, scaler, progress, args):
    state = {
        "model": {k: v.detach().cpu().clone() for k, v in trainable_state(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "progress": dict(progress),
        "run_config": {k: v for k, v in vars(args).items() if k not in ("config", "resume")},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    try:
        # Optimizer state and RNG states are tensors, numbers, tuples and dicts: weights_only suffices.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: cannot read the checkpoint ({type(error).__name__}); "
                        f"delete it to start over, or restore a backup") from None


def truncate_metrics(path, global_step, rows=None):
    """On resume, drop log rows written after the checkpoint, so the log has no repeats.

    `rows` is how many rows the log had when the checkpoint was written (a validation at the
    checkpoint's own step may have come after it); checkpoints that predate it keep rows by step.
    Returns the number of rows kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if rows is not None and len(kept) == rows:
            break
        try:
            if json.loads(line).get("step", 0) <= global_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a row cut by the kill
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(row + "\n" for row in kept)))
    return len(kept)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one row per log step and per validation), and TensorBoard when available."""

    def __init__(self, output_dir, report_to):
        self.path = Path(output_dir) / METRICS_NAME
        self.rows = 0  # rows in the file, recorded in each checkpoint
        self.tensorboard = None
        if report_to in ("auto", "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                if report_to == "tensorboard":
                    raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows += 1
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

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


def print_banner(args, model, device, dtype, stage, sizes):
    line = "=" * 50
    print(line)
    print("MiniMind training configuration:")
    print(line)
    config = model.config
    shown = {
        "stage": stage, "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "max_seq_len": args.max_seq_len, "dropout": config.dropout,
        "use_moe": int(config.use_moe), "epochs": args.epochs, "batch_size": args.batch_size,
        "accumulation_steps": args.accumulation_steps, "learning_rate": args.learning_rate, "min_lr": args.min_lr,
        "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
        "dtype": str(dtype).replace("torch.", ""), "seed": args.seed, "data": ", ".join(args.data),
        "pretrained_path": args.pretrained_path or "(none)", "output_dir": args.output_dir,
    }
    for key, value in shown.items():
        print(f"{key}: {value}")
    print(line)
    print(f"Device: {device}")
    print(f"Model {describe_parameters(model)}")
    print(f"Data: {sizes}")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class StopRequested:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step...", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def cosine_schedule(warmup_steps, total_steps, peak_lr, min_lr):
    """Multiplier of the peak lr: linear warmup, then cosine decay to min_lr at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))) / peak_lr
    return factor


def train(args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    output_dir = Path(args.output_dir)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    resumed = None
    if args.resume:
        if not checkpoint_path.exists():
            raise UserError(f"--resume: no {CHECKPOINT_NAME} in {output_dir}; start without --resume")
        resumed = load_checkpoint(checkpoint_path)

    # data
    from .tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    paths, eval_paths = resolve_data(args)
    stage = args.stage
    train_set = build_dataset(stage, paths, tokenizer, args)
    if eval_paths:
        val_set = build_dataset(stage, eval_paths, tokenizer, args)
    else:
        train_set, val_set = split_validation(train_set, args.val_fraction, args.seed)
    if len(train_set) == 0:
        raise UserError(f"no training samples in {', '.join(map(str, paths))} (too short for --max_seq_len {args.max_seq_len}?)")
    sizes = f"{len(train_set)} training samples, {len(val_set) if val_set else 0} validation samples"

    # model
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(args, len(tokenizer))
    model.model.gradient_checkpointing = args.gradient_checkpointing
    reference = None
    if args.lora_rank:
        from .lora import add_lora
        model = add_lora(model, args)
    if stage == "dpo":
        from .dpo import make_reference
        reference = make_reference(model, args)
    model.to(device).train()
    if args.compile:
        # compiles the decoder stack in place (parameter names, hence checkpoints, unchanged)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        core.model.compile()

    # optimizer and schedule
    batches_per_epoch = math.ceil(len(train_set) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    if args.warmup_steps is None:
        args.warmup_steps = max(1, round(0.02 * total_steps))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    # fused: one pass over each parameter's optimizer state instead of ~10 (see training_step.py)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(args.warmup_steps, total_steps, args.learning_rate, args.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    progress = {"epoch": 0, "batch": 0, "global_step": 0, "epoch_loss_sum": 0.0, "epoch_loss_count": 0}
    if resumed is not None:
        from .checkpoint import load_weights
        if args.lora_rank:
            from .lora import load_adapter_state
            load_adapter_state(model, resumed["model"])
        else:
            load_weights(model, resumed["model"], source=str(checkpoint_path))
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        set_rng_state(resumed["rng"])
        progress = dict(resumed["progress"])

    output_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(args, output_dir / RUN_CONFIG_NAME)
    log = MetricsLog(output_dir, args.report_to)
    if resumed is not None:
        log.rows = truncate_metrics(log.path, progress["global_step"], progress.get("metrics_rows"))
        print(f"Resuming from {checkpoint_path}: epoch {progress['epoch'] + 1}, step {progress['global_step']}")
    elif log.path.exists():
        log.path.unlink()

    print_banner(args, model, device, dtype, stage, sizes)
    print(f"Training for {args.epochs} epochs ({total_steps} optimizer steps)...")

    def diverged(what):
        last_good = checkpoint_path if checkpoint_path.exists() else "not written yet"
        raise UserError(f"training diverged at step {progress['global_step'] + 1} (epoch {progress['epoch'] + 1}): {what}; "
                        f"the last good checkpoint is {last_good}. Lower --learning_rate, "
                        f"or use --dtype float32 / bfloat16, then --resume")

    def checkpoint():
        # never overwrite the last good checkpoint with weights that overflowed
        if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
            diverged("the weights became inf or nan")
        progress["metrics_rows"] = log.rows
        save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, progress, args)

    def run_validation():
        result = validate(model, val_set, args, device, autocast, reference)
        if result:
            log.write({"step": progress["global_step"], "epoch": progress["epoch"] + 1, **result})
            shown = ", ".join(f"{k}: {v:.4f}" for k, v in result.items())
            print(f"Validation at step {progress['global_step']}: {shown}")
        return result

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=progress["global_step"], desc="training", unit="step",
               dynamic_ncols=True, leave=False, file=sys.stderr, disable=None)
    first_val = run_validation() if resumed is None else None
    last_val = first_val
    stop_reason = None
    window_tokens, window_start = 0, time.perf_counter()
    with StopRequested() as stop:
        while progress["epoch"] < args.epochs and progress["global_step"] < total_steps:
            epoch = progress["epoch"]
            batches = epoch_batches(train_set, args, epoch)
            groups = [batches[i:i + args.accumulation_steps] for i in range(0, len(batches), args.accumulation_steps)]
            step_in_epoch = progress["batch"] // args.accumulation_steps
            remaining = iterate_batches(train_set, batches[progress["batch"]:], args.num_workers, device)
            for group in groups[step_in_epoch:]:
                step_metrics = {}
                for batch in (next(remaining) for _ in group):
                    with autocast():
                        loss, metrics = stage_loss(model, batch, stage, args, reference)
                    if not torch.isfinite(loss):
                        diverged(f"the loss became {loss.item()}")
                    scaler.scale(loss / len(group)).backward()
                    for k, v in metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / len(group)
                    window_tokens += int(batch["attention_mask"].sum())
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress["batch"] += len(group)
                progress["global_step"] += 1
                progress["epoch_loss_sum"] += step_metrics["loss"]
                progress["epoch_loss_count"] += 1
                step = progress["global_step"]
                bar.update(1)
                if step % args.log_interval == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    avg = progress["epoch_loss_sum"] / progress["epoch_loss_count"]
                    lr = scheduler.get_last_lr()[0]
                    extra = "".join(f", {k}: {v:.4f}" for k, v in step_metrics.items() if k != "loss")
                    bar.write(f"Epoch [{epoch + 1}/{args.epochs}], Step [{step_in_epoch + 1}/{len(groups)}], "
                              f"Loss: {step_metrics['loss']:.4f}, Avg Loss: {avg:.4f}{extra}, LR: {lr:.2e}, "
                              f"Tokens/s: {tokens_per_s:.0f}")
                    log.write({"step": step, "epoch": epoch + 1, **step_metrics, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
                    window_tokens, window_start = 0, time.perf_counter()
                step_in_epoch += 1
                if args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
                    last_val = run_validation()
                if args.save_steps and step % args.save_steps == 0:
                    checkpoint()
                if stop.signal is not None:
                    stop_reason = stop.signal
                    break
                if step >= total_steps:
                    break
            if stop_reason is not None:
                break
            # end of the epoch, or of the step budget
            completed = progress["batch"] >= len(batches)
            progress.update(epoch=epoch + 1, batch=0, epoch_loss_sum=0.0, epoch_loss_count=0)
            last_val = run_validation()
            if completed and (epoch + 1) % args.save_interval == 0:
                path = output_dir / f"model_epoch_{epoch + 1}.pth"
                save_original_format(export_model(model), path)
                bar.write(f"Model saved to: {path}")
            checkpoint()
    bar.close()
    if stop_reason is not None:
        checkpoint()
        log.close()
        print(f"Stopped by {signal.Signals(stop_reason).name}. Checkpoint saved to {checkpoint_path}; "
              f"continue with the same command plus --resume.")
        return 128 + stop_reason
    finish(args, model, tokenizer, output_dir, log, first_val, last_val, train_set, val_set, stage)
    return 0


def save_original_format(model, path):
    """A .pth state dict as the original MiniMind writes it, and config.json beside it so that
    load_model / --pretrained_path know its shape."""
    save_state_dict(model, path)
    config_json = model.config.to_json_string()
    atomic_write(Path(path).parent / "config.json", lambda tmp: Path(tmp).write_text(config_json))


def export_model(model):
    """The plain model to save: LoRA adapters merged into a copy when present."""
    if getattr(model, "peft_config", None):
        from .lora import merged_copy
        return merged_copy(model)
    return model


def finish(args, model, tokenizer, output_dir, log, first_val, last_val, train_set, val_set, stage):
    written = []
    final_model = export_model(model)
    final_pth = output_dir / "model_final.pth"
    save_original_format(final_model, final_pth)
    written.append(final_pth)
    final_dir = output_dir / "final"
    final_model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    written.append(final_dir)
    if getattr(model, "peft_config", None):
        adapter_dir = output_dir / "adapter"
        model.save_pretrained(adapter_dir)
        written.append(adapter_dir)
    log.close()
    written.append(log.path)
    if log.tensorboard is not None:
        written.append(output_dir / "tensorboard")
    png = plot_losses(log.path, output_dir / "loss.png")
    if png:
        written.append(png)
    written.append(output_dir / RUN_CONFIG_NAME)
    written.append(output_dir / CHECKPOINT_NAME)
    if first_val and last_val:
        print(f"Validation loss: {first_val['val_loss']:.4f} at the start -> {last_val['val_loss']:.4f} at the end")
    if args.sample_tokens:
        print_sample(final_model, tokenizer, val_set if val_set is not None and len(val_set) else train_set, stage, args)
    print(f"Training complete! Final model saved to: {final_pth}")
    peak = peak_memory()
    if peak:
        print(f"Peak memory: {peak}")
    print("Written:")
    for path in written:
        print(f"  {path}")


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


def peak_memory():
    """The run's peak memory as the system counts it: the most resident memory (VmHWM, Linux), and on
    a GPU the most its tensors held at once. Empty where neither is known."""
    parts = []
    resident = process_memory_mib("VmHWM")
    if resident is not None:
        parts.append(f"{resident:.0f} MiB resident")
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        parts.append(f"{torch.cuda.max_memory_allocated() // 2**20} MiB of GPU tensors")
    return ", ".join(parts)


def print_sample(model, tokenizer, dataset, stage, args):
    """A short greedy continuation from the trained model, so the user sees what it learned:
    the first 16 tokens of a validation text, or the prompt of a validation conversation."""
    model.eval()
    item = dataset[0]
    ids = item["input_ids"] if "input_ids" in item else item["chosen_input_ids"]
    labels = item["labels"] if "labels" in item else item["chosen_labels"]
    if stage == "pretrain":
        prompt_ids = ids[:16].tolist()
    else:
        answer_start = int((labels != -100).nonzero()[0]) if (labels != -100).any() else len(ids)
        prompt_ids = ids[:answer_start].tolist()
    from .generation import generate
    out = generate(model, [prompt_ids], max_new_tokens=args.sample_tokens, temperature=0, tokenizer=tokenizer)
    print("Sample (greedy):")
    print(f"  prompt: {tokenizer.decode(prompt_ids)!r}")
    print(f"  output: {out.texts[0]!r}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return train(args)
