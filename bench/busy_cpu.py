"""Training throughput on a busy CPU: what a competing CPU-bound process does to a training step,
with OpenMP's threads spinning while they wait (its default), spinning briefly (GOMP_SPINCOUNT=10000,
what the decoding commands set; 1000, what train.py and the other commands set) and sleeping at once
(OMP_WAIT_POLICY=PASSIVE, what they set before 2026-12-07).

    python bench/busy_cpu.py                       # tiny, the CPU session's and the default shape, 20 s per measurement
    python bench/busy_cpu.py --shapes session --threads 2 --policies passive "brief spin"

For each shape, thread count and wait policy, a fresh process times the trainer's step (forward,
chunked loss, backward, clipping, fused AdamW, dropout 0.1) for --seconds on an idle machine, then
again while one competing process spins a core (`while True: pass`). It prints tokens/s and busy / idle.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": (["--hidden_size", "64", "--num_layers", "2", "--num_heads", "4"], 4, 128),
          "session": (["--config", str(ROOT / "recipes" / "cpu" / "pretrain.yaml")], 8, 128),  # the CPU session's
          "default": ([], 4, 256)}
POLICIES = {"spin": {}, "short spin": {"GOMP_SPINCOUNT": "10000"}, "brief spin": {"GOMP_SPINCOUNT": "1000"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "session", "default"])
    parser.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed steps per measurement")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--measure", nargs=3, metavar=("SHAPE", "THREADS", "SECONDS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(shape, threads, seconds):
    """In this process: tokens/s of the trainer's step for `seconds` after two warm-up steps."""
    import contextlib

    import torch
    sys.path.insert(0, str(ROOT))
    from minimind.commands.train import parse as parse_train_args
    from minimind.training.trainer import Trainer
    from train_throughput import scratch_dir

    flags, batch, seq = SHAPES[shape]
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(parse_train_args(flags + ["--batch_size", str(batch), "--max_seq_len", str(seq),
                                                    "--device", "cpu", "--report_to", "none", "--output_dir",
                                                    scratch_dir("bench-busy-")]))
        trainer.setup()
    ids = torch.randint(3, 6400, (batch, seq), generator=torch.Generator().manual_seed(0))
    micro = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}]
    for _ in range(2):
        trainer.step(micro)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        trainer.step(micro)
        steps += 1
    print(steps * batch * seq / (time.perf_counter() - start))


def timed_run(shape, threads, seconds, policy):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update(POLICIES[policy])
    result = subprocess.run([sys.executable, __file__, "--measure", shape, str(threads), str(seconds)],
                            capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.split()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        shape, threads, seconds = args.measure
        return measure(shape, int(threads), float(seconds))
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'shape':8s} {'threads':>7s} {'threads wait':>13s} {'idle tok/s':>11s} {'busy tok/s':>11s} {'busy/idle':>9s}")
    for shape in args.shapes:
        for threads in args.threads:
            for policy in args.policies:
                idle = timed_run(shape, threads, args.seconds, policy)
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(1)
                    busy = timed_run(shape, threads, args.seconds, policy)
                finally:
                    competitor.kill()
                    competitor.wait()
                print(f"{shape:8s} {threads:7d} {policy:>13s} {idle:11.0f} {busy:11.0f} {busy / idle:9.2f}", flush=True)


if __name__ == "__main__":
    main()
