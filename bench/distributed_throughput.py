"""Data parallel throughput on this machine: one process with N threads against N torchrun ranks
with one thread each, training the same global batch.

    python bench/distributed_throughput.py                      # the seed's shape, 2 ranks, 30 steps
    python bench/distributed_throughput.py --shape tiny --steps 60
    python bench/distributed_throughput.py --ranks 2 --batch_size 4 --repeats 2

Each configuration runs train.py on the bundled pretraining data (dropout off, no validation, no
checkpoints) and reads its tokens/s from metrics.jsonl, leaving out the first --warmup steps.
The runs alternate (one process, ranks, one process, ...) so that a change in the machine's load
hits both; the medians and their ratio are printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": ["--hidden_size", "64", "--num_layers", "2", "--num_heads", "4", "--max_seq_len", "128"],
    "default": [],  # the seed's: hidden 512, 8 layers, sequence 512
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (and the single process's threads)")
    parser.add_argument("--batch_size", type=int, default=4, help="per rank; the single process takes ranks x this")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rate")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, alternating")
    return parser.parse_args(argv)


def run(args, ranks, output_dir):
    """tokens/s of one training run: `ranks` torchrun processes of one thread, or one process of
    args.ranks threads when ranks == 1."""
    threads = 1 if ranks > 1 else args.ranks
    batch = args.batch_size * (args.ranks if ranks == 1 else 1)
    flags = SHAPES[args.shape] + ["--batch_size", str(batch), "--max_steps", str(args.steps), "--log_interval", "1",
                                  "--dropout", "0", "--val_fraction", "0", "--save_steps", "0", "--sample_tokens", "0",
                                  "--save_interval", "1000000", "--device", "cpu", "--report_to", "none",
                                  "--output_dir", str(output_dir)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + [str(ROOT / "train.py")] + flags
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row and row["step"] > args.warmup]
    return statistics.median(rates)


def main(argv=None):
    args = parse_args(argv)
    results = {"one process": [], "ranks": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name, ranks in (("one process", 1), ("ranks", args.ranks)):
                results[name].append(run(args, ranks, Path(folder) / f"{name.replace(' ', '_')}_{repeat}"))
                print(f"{name}: {results[name][-1]:.0f} tokens/s", flush=True)
    single, ranked = statistics.median(results["one process"]), statistics.median(results["ranks"])
    print(f"shape {args.shape}, global batch {args.batch_size * args.ranks}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"one process, {args.ranks} threads: {single:.0f} tokens/s")
    print(f"{args.ranks} ranks, 1 thread each: {ranked:.0f} tokens/s")
    print(f"ratio ranks / one process: {ranked / single:.2f}x")


if __name__ == "__main__":
    main()
