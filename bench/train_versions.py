"""Training throughput of this checkout against another git revision: the same `train.py` run from
both, alternating, so that a change of the machine's load reaches both alike.

    python bench/train_versions.py --against fc55a2a               # before the trainer (issue 15), seed's shape
    python bench/train_versions.py --against HEAD~3 --shape tiny --repeats 5

The other revision is checked out into a temporary git worktree (removed after) and its own
train.py and minimind/ run there, each side with its own token cache. Each run trains --steps
optimizer steps on the bundled pretraining data (dropout off, no validation, no checkpoints) and
its tokens/s is the median of the per-step rates in metrics.jsonl after --warmup steps; the table
shows each run, the medians over runs and their ratio (this checkout / the other). Both sides run
with the same OpenMP wait policy (what train.py sets now, GOMP_SPINCOUNT=1000, unless you export
another), so only the code differs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_throughput import ROOT, SHAPES  # noqa: E402  the same shapes as the data-parallel bench

from minimind.commands.main import set_openmp_waiting  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with (a commit, tag, HEAD~N)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run [30]")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rate [5]")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating [3]")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both [torch's default]")
    return parser.parse_args(argv)


def tokens_per_s(root, args, scratch):
    """Median tokens/s of one train.py run from the checkout at `root`."""
    output_dir = Path(tempfile.mkdtemp(dir=scratch))
    flags = SHAPES[args.shape] + ["--max_steps", str(args.steps), "--log_interval", "1", "--dropout", "0",
                                  "--val_fraction", "0", "--save_steps", "0", "--sample_tokens", "0",
                                  "--save_interval", "1000", "--device", "cpu", "--report_to", "none",
                                  "--output_dir", str(output_dir)]
    env = {**os.environ, "PYTHONPATH": str(root), "MINIMIND_CACHE": str(Path(scratch) / f"cache-{Path(root).name}")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run([sys.executable, str(Path(root) / "train.py")] + flags, cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["tokens_per_s"] for row in rows if "tokens_per_s" in row and row["step"] > args.warmup)


def main(argv=None):
    args = parse_args(argv)
    set_openmp_waiting("train")  # what train.py sets now unless exported (older revisions did not): the same for both
    with tempfile.TemporaryDirectory(prefix="train-versions-") as scratch:
        other = Path(scratch) / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.against],
                       check=True, capture_output=True)
        try:
            rates = {"this checkout": [], args.against: []}
            for _ in range(args.repeats):
                rates["this checkout"].append(tokens_per_s(ROOT, args, scratch))
                rates[args.against].append(tokens_per_s(other, args, scratch))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    print(f"shape {args.shape}, {args.steps} steps a run (first {args.warmup} left out), load {os.getloadavg()[0]:.1f}")
    print("| code | tokens/s of each run | median |")
    print("| --- | --- | ---: |")
    for name, values in rates.items():
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} |")
    ratio = statistics.median(rates["this checkout"]) / statistics.median(rates[args.against])
    print(f"this checkout / {args.against}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
