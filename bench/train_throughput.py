"""Training throughput: the trainer's own step against transformers' LlamaForCausalLM of the same shape.

In one process, alternating, it times full training steps (forward, loss, backward, gradient
clipping, optimizer step) of (a) `Trainer.step`, exactly what train.py runs (MiniMindForCausalLM,
chunked cross-entropy in its forward, fused AdamW, the schedule), built from train.py's flags, and
(b) LlamaForCausalLM with the identical shape and parameter count, trained the plain way
(out = model(ids, labels=ids); out.loss.backward(); clip; torch.optim.AdamW step), plus a large
matmul that measures what this machine's matrix units deliver. Medians after warm-up. Dropout is
off in both (--dropout to change ours); --dtype other than float32 means autocast, as in train.py.

    python bench/train_throughput.py                       # the seed's shape: 512 x 8 layers, batch 4 x 512
    python bench/train_throughput.py --shape tiny
    python bench/train_throughput.py --shape 104m --reps 2
    python bench/train_throughput.py --device cuda --dtype bfloat16

Model FLOPs utilisation = (6 N + 6 L S d) per token x tokens/s / measured matmul FLOP/s, where N
counts parameters (the tied embedding once: it is the lm_head matmul) and 6 L S d is causal
attention's QK^T and AV, forward and backward, averaged over positions (half of a full S x S).
"""
import argparse
import atexit
import contextlib
import copy
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimind.commands.train import parse as parse_train_args  # noqa: E402
from minimind.training.run_log import process_memory_mib  # noqa: E402
from minimind.training.trainer import Trainer  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=128, batch_size=4),
    "default": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, seq_len=512, batch_size=4),
    "104m": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2, seq_len=512, batch_size=4),
}
LR = 1e-4


def scratch_dir(prefix):
    """A temporary folder for a trainer's outputs, removed when the process ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default", help="preset; the flags below override it")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "seq_len", "batch_size"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--dropout", type=float, default=0.0, help="our model's dropout (train.py's default is 0.1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each model first")
    parser.add_argument("--reps", type=int, default=3, help="timed steps of each model, alternating")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--llama-fused-adamw", action="store_true",
                        help="also time Llama with our fused AdamW, to separate the optimizer's share of the gain")
    parser.add_argument("--compile", nargs="?", const="default", action="append", metavar="MODE",
                        help="also time our step with the decoder stack torch.compile'd in this mode (default: "
                             "'default'; repeat the flag for several, e.g. --compile --compile max-autotune-no-cudagraphs), "
                             "and report the compile time")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-check", action="store_true", help="skip the fast-vs-plain loss check")
    args = parser.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_ours(args, compile_mode=None):
    """A Trainer set up from train.py's flags for this shape (its outputs go to a temporary folder)."""
    flags = ["--hidden_size", args.hidden_size, "--num_layers", args.num_layers, "--num_heads", args.num_heads,
             "--num_key_value_heads", args.num_kv_heads, "--vocab_size", args.vocab_size, "--max_seq_len",
             args.seq_len, "--batch_size", args.batch_size, "--dropout", args.dropout, "--learning_rate", LR,
             "--device", args.device, "--dtype", args.dtype, "--report_to", "none",
             "--output_dir", scratch_dir("bench-trainer-")]
    if compile_mode:
        flags.append("--compile")
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's set-up messages are not the benchmark's
        trainer = Trainer(parse_train_args([str(flag) for flag in flags]))
        trainer.setup()
    if compile_mode and compile_mode != "default":
        trainer.model.model.compile(mode=compile_mode)
    return trainer


def build_llama(args, ours):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = ours.model
    config = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=ours.config.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size, max_position_embeddings=args.seq_len,
        rms_norm_eps=ours.config.rms_norm_eps, rope_theta=ours.config.rope_theta, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(args.device)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def batch(args):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return ids.to(args.device)


def training_batch(ids):
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def ours_stepper(trainer):
    def step(ids):
        return trainer.step([training_batch(ids)])["loss"]
    return step


def llama_stepper(model, args, fused=False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)
    autocast = (contextlib.nullcontext() if args.dtype == "float32"
                else torch.autocast(device_type=args.device.split(":")[0], dtype=getattr(torch, args.dtype)))

    def step(ids):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py's default --grad_clip 1.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_flops_per_s(args):
    size = args.matmul_size
    a = torch.randn(size, size, device=args.device, dtype=getattr(torch, args.dtype))
    b = torch.randn(size, size, device=args.device, dtype=getattr(torch, args.dtype))
    repeats = 1 if args.device == "cpu" else 20

    def run():
        for _ in range(repeats):
            a @ b
    run()
    return lambda: 2 * size**3 * repeats / timed(run, args.device)


def flops_per_token(args, n_params):
    attention = 6 * args.num_layers * args.seq_len * args.hidden_size  # H * D = hidden here
    return 6 * n_params + attention


def check_numerics(args):
    """The trainer's step against the plain eager one (full logits, F.cross_entropy, torch.optim.AdamW,
    clipping), same weights and batch: the largest relative difference of the loss of the step and
    the loss after it."""
    ids = batch(args)
    trainer = build_ours(args)
    plain = copy.deepcopy(trainer.model)
    first_lr = trainer.optimizer.param_groups[0]["lr"]  # the schedule's first value (warmup)
    fast_first = ours_stepper(trainer)(ids)
    decay = trainer.config.optim.weight_decay
    optimizer = torch.optim.AdamW([{"params": [p for p in plain.parameters() if p.dim() >= 2], "weight_decay": decay},
                                   {"params": [p for p in plain.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=first_lr)
    plain_first = plain(ids, labels=ids).loss
    plain_first.backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        fast_after = trainer.model(ids, labels=ids).loss.item()
        plain_after = plain(ids, labels=ids).loss.item()
    return max(abs(fast_first - plain_first.item()) / abs(plain_first.item()), abs(fast_after - plain_after) / abs(plain_after))


def _peak_memory_child(args, which, queue):
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = batch(args)
    ours = build_ours(args)
    if which == "ours":
        step = ours_stepper(ours)
    else:
        step = llama_stepper(build_llama(args, ours), args)
        del ours
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(ids)
        step(ids)
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - before) / 2**20)
    else:
        before = process_memory_mib("VmRSS")
        if before is None:
            raise RuntimeError("peak memory on CPU reads /proc/self/status, which needs Linux (pass --no-memory)")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        step(ids)
        step(ids)
        queue.put(process_memory_mib("VmHWM") - before)


def peak_memory_mib(args, which):
    """Peak memory a training step adds on top of the model's weights (activations, gradients,
    optimizer state, workspace), measured in a fresh process so the two models do not mix:
    peak RSS on CPU, peak allocated memory on CUDA."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_child, args=(args, which, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = batch(args)
    tokens = args.batch_size * args.seq_len
    ours = build_ours(args)
    llama = build_llama(args, ours)
    n_ours, n_llama = count_parameters(ours.model), count_parameters(llama)
    if n_ours != n_llama:
        sys.exit(f"error: parameter counts differ (ours {n_ours}, Llama {n_llama}): the shapes are not identical")
    print(f"shape: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, "
          f"{args.num_kv_heads} kv heads, vocab {args.vocab_size}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads; {n_ours / 1e6:.1f}M parameters")

    contenders = {"ours": ours_stepper(ours), "llama": llama_stepper(llama, args)}
    if args.llama_fused_adamw:
        llama_fused = copy.deepcopy(llama)
        contenders["llama+fused AdamW"] = llama_stepper(llama_fused, args, fused=True)
    for mode in args.compile or []:
        name = "ours+compile" if mode == "default" else f"ours+compile {mode}"
        contenders[name] = ours_stepper(build_ours(args, compile_mode=mode))
        print(f"first step of {name} (compiling): {timed(lambda: contenders[name](ids), args.device):.1f} s")
    for _ in range(args.warmup):
        for step in contenders.values():
            step(ids)
    matmul = matmul_flops_per_s(args)
    times = {name: [] for name in contenders}
    matmul_rates = []
    for _ in range(args.reps):
        for name, step in contenders.items():
            times[name].append(timed(lambda: step(ids), args.device))
        matmul_rates.append(matmul())
    peak = statistics.median(matmul_rates)
    per_token = flops_per_token(args, n_ours)
    print(f"matmul {args.matmul_size}^2 {args.dtype}: {peak / 1e9:.1f} GFLOP/s (median of {args.reps})")
    print(f"model FLOPs per token: {per_token / 1e6:.1f}M (6N + causal attention)")
    del ours, llama, contenders

    memory = {}
    if not args.no_memory:
        for name in ("ours", "llama"):
            memory[name] = peak_memory_mib(args, name)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    width = max(len(name) for name in rates)
    print(f"{'':{width}s} {'tokens/s':>9s} {'step s':>7s} {'MFU':>6s} {'peak MiB':>9s}")
    for name, rate in rates.items():
        mem = f"{memory[name]:9.0f}" if name in memory else f"{'-':>9s}"
        print(f"{name:{width}s} {rate:9.0f} {tokens / rate:7.2f} {rate * per_token / peak:6.2f} {mem}")
    print(f"ratio ours / llama: {rates['ours'] / rates['llama']:.2f}x")
    for name in rates:
        if name.startswith("ours+compile"):
            print(f"ratio {name} / llama: {rates[name] / rates['llama']:.2f}x")
    if args.llama_fused_adamw:
        print(f"ratio ours / llama+fused AdamW: {rates['ours'] / rates['llama+fused AdamW']:.2f}x")
    if not args.no_check:
        print(f"loss of and after one step, trainer vs plain eager float32: {check_numerics(args):.1e} relative (max)")


if __name__ == "__main__":
    main()
