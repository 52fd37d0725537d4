"""How close `--dry_run`'s forecast comes to the run it forecasts: dry run, then the real run, back to back.

    python bench/forecast_accuracy.py default                  # python train.py: ~6 min on an idle 2-core CPU
    python bench/forecast_accuracy.py small 104m sft           # more shapes, bounded by --max_steps
    python bench/forecast_accuracy.py custom -- --hidden_size 384 --num_layers 6 --epochs 1

For each configuration: `python train.py FLAGS --dry_run`, then `python train.py FLAGS`, each a
fresh process, into a temporary --output_dir that is removed after. Compared: the forecast wall
time (the dry run's "Wall time: ... in all") against the real process's wall clock, start-up
included, and the forecast peak resident memory against the one the real run reports (VmHWM at
its end). Also shown: the real run's own forecast line after its first steps, and the ETA of its
first log line plus the time spent by then. Ratios are forecast / measured; the issue's bar is
0.75-1.25 for time and 0.8-1.2 for memory.

Run it alone on the machine (on a shared one: `flock /work/wt/measure.lock python bench/...`);
it prints the load average before and after each run, since the forecast can only be as steady
as the machine.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "default": [],
    "small": ["--hidden_size", "256", "--num_layers", "4", "--num_heads", "4", "--num_key_value_heads", "2"],
    "104m": ["--hidden_size", "768", "--num_layers", "16", "--max_steps", "16"],
    "sft": ["--data", "data/sft_train.jsonl", "--eval_data", "data/sft_eval.jsonl", "--batch_size", "16",
            "--max_seq_len", "256", "--max_steps", "60", "--learning_rate", "5e-4"],
}


def seconds(text):
    """'1 h 05 min', '5 min 40 s', '42 s' -> seconds."""
    total = 0
    for number, unit in re.findall(r"(\d+) (h|min|s)\b", text):
        total += int(number) * {"h": 3600, "min": 60, "s": 1}[unit]
    return total


def load():
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def run(flags, output_dir):
    """Run train.py with flags; returns (stdout, wall seconds, seconds at which each line came, load
    before, load after)."""
    before, start = load(), time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, "--output_dir", str(output_dir)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [(line, time.perf_counter() - start) for line in process.stdout]
    if process.wait() != 0:
        sys.exit(f"train.py {' '.join(flags)} failed:\n{''.join(line for line, _ in lines[-20:])}")
    return "".join(line for line, _ in lines), time.perf_counter() - start, lines, before, load()


def compare(name, flags, keep=None):
    scratch = Path(tempfile.mkdtemp(prefix=f"forecast-{name}-"))
    try:
        dry, dry_wall, _, dry_load, _ = run(flags + ["--dry_run"], scratch / "run")
        real, real_wall, lines, real_load, end_load = run(flags, scratch / "run")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        Path(keep, f"{name}.dry_run.txt").write_text(dry)
        Path(keep, f"{name}.run.txt").write_text(real)
    forecast = seconds(re.search(r"Wall time: .*?, ([\d a-z]+) in all", dry).group(1))
    forecast_mib = float(re.search(r"Peak memory: (\d+) MiB resident", dry).group(1))
    real_mib = float(re.search(r"Peak memory: (\d+) MiB resident", real).group(1))
    own = re.search(r"Estimate: about ([\d a-z]+),", real)
    # the first log line's ETA plus the time it came at: the whole run as that line forecasts it
    first_log = next(((re.search(r"ETA: ([\d a-z]+)$", line.strip()), at) for line, at in lines if "ETA:" in line),
                     (None, 0))
    eta_total = seconds(first_log[0].group(1)) + first_log[1] if first_log[0] else float("nan")
    print(f"| {name} | {' '.join(flags) or '(none)'} | {minutes(forecast)} | {minutes(real_wall)} | "
          f"{forecast / real_wall:.2f} | {forecast_mib:.0f} | {real_mib:.0f} | {forecast_mib / real_mib:.2f} | "
          f"{minutes(seconds(own.group(1))) if own else '-'} | {minutes(eta_total)} | {minutes(dry_wall)} | "
          f"{dry_load} / {real_load} / {end_load} |", flush=True)


def minutes(value):
    return f"{value / 60:.2f}"


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s SHAPE... [-- TRAIN.PY FLAGS FOR EVERY RUN]")
    parser.add_argument("shapes", nargs="+", choices=[*SHAPES, "custom"], help="custom: only the flags after --")
    parser.add_argument("--keep", default=None, help="a folder to keep both runs' output in [none]")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    print("| run | flags | forecast min | measured min | ratio | forecast MiB | measured MiB | ratio | "
          "real run's own forecast, min | first log line + ETA, min | dry run took, min | load: dry / real / after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    for name in args.shapes:
        compare(name, SHAPES.get(name, []) + extra, args.keep)


if __name__ == "__main__":
    main()
