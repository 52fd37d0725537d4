"""Training at the size MiniMind's users train on: a 1 GB file, from the first start (which prepares the
token cache) and from a second start (which reads it), measured from outside the run.

    python bench/make_scale_data.py --kind sft --size 1GB --output /work/scratch/sft_1g.jsonl
    python bench/data_scale.py --data /work/scratch/sft_1g.jsonl --tokenizer tests/fixtures/minimind3_tokenizer
    python bench/make_scale_data.py --kind pretrain --size 1GB --output /work/scratch/pretrain_1g.jsonl
    python bench/data_scale.py --data /work/scratch/pretrain_1g.jsonl

It runs `python train.py` twice with a tiny model (0.46M parameters, as issue 28's measurements) for
--max_steps steps, each start with the same flags and a cache folder of its own that the second start
reuses (--cache, a fresh one by default: the first start prepares), and reports for each:

- preparation: seconds from the start to the run's "Data:" summary line (the cache prepared or read);
- time to the first step: seconds from the start to the first "Step [1/" log line (imports, the
  cache, the model, the first validation included);
- peak memory while preparing and while training (until the end of the run): the resident memory
  of the run's process, and of it and its preparation workers together, sampled every 0.2 s from
  /proc (Linux), so that workers count too.

The load average is printed beside the timings: on a shared machine they vary with it.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--hidden_size", "64", "--num_layers", "2", "--num_heads", "4", "--num_key_value_heads", "2"]


def resident_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid):
    """The process ids under `pid` (its workers, theirs), from /proc/*/stat."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rpartition(")")[2].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class MemorySampler(threading.Thread):
    """Peak resident memory of a process (alone, and with its descendants), per phase."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.phase, self.peaks, self.running = pid, "preparing", {}, True

    def run(self):
        while self.running:
            own = resident_mib(self.pid)
            total = own + sum(resident_mib(child) for child in descendants(self.pid))
            alone, together = self.peaks.get(self.phase, (0.0, 0.0))
            self.peaks[self.phase] = (max(alone, own), max(together, total))
            time.sleep(0.2)


def start_run(args, cache, output_dir):
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(args.data), *TINY_MODEL,
               "--max_seq_len", str(args.max_seq_len), "--batch_size", str(args.batch_size),
               "--max_steps", str(args.max_steps), "--log_interval", "1", "--report_to", "none",
               "--sample_tokens", "0", "--device", "cpu", "--output_dir", str(output_dir), *args.extra]
    if args.tokenizer:
        command += ["--tokenizer", str(args.tokenizer)]
    environment = {**os.environ, "MINIMIND_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env=environment)
    sampler = MemorySampler(process.pid)
    sampler.start()
    result = {"command": " ".join(command)}
    for line in process.stdout:
        now = time.perf_counter() - start
        if line.startswith("Data:") and "prepared" not in result:
            result["prepared"], result["summary"] = now, line.strip()
            sampler.phase = "training"
        if "Step [1/" in line and "first_step" not in result:
            result["first_step"] = now
        if args.verbose:
            print(f"[{now:7.1f} s] {line}", end="")
        result.setdefault("tail", []).append(line)
        result["tail"] = result["tail"][-20:]
    process.wait()
    sampler.running = False
    sampler.join()
    result.update(returncode=process.returncode, seconds=time.perf_counter() - start, peaks=sampler.peaks)
    if process.returncode:
        sys.exit(f"the run failed ({process.returncode}):\n{result['command']}\n" + "".join(result["tail"]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", help="for SFT data with tools and thinking: tests/fixtures/minimind3_tokenizer")
    parser.add_argument("--cache", help="cache folder: the first start prepares into it [a new one under --scratch]")
    parser.add_argument("--scratch", default=None, help="for the cache and the runs' outputs [a temporary folder]")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--starts", type=int, default=2, help="runs; the first prepares, the others read the cache")
    parser.add_argument("--verbose", action="store_true", help="show the runs' output with timestamps")
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix="data_scale_"))
    cache = Path(args.cache) if args.cache else scratch / "cache"
    size = Path(args.data).stat().st_size
    print(f"{args.data}: {size / 1e9:.2f} GB; cache {cache}; load average before: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    for start in range(args.starts):
        result = start_run(args, cache, scratch / f"run{start}")
        (prep_own, prep_all), (train_own, train_all) = (result["peaks"].get(phase, (0.0, 0.0))
                                                        for phase in ("preparing", "training"))
        print(f"start {start + 1}: data ready at {result['prepared']:.1f} s, "
              f"first step at {result['first_step']:.1f} s, "
              f"run {result['seconds']:.1f} s; peak resident memory while preparing {prep_own:,.0f} MiB "
              f"({prep_all:,.0f} MiB with its workers), while training {train_own:,.0f} MiB "
              f"({train_all:,.0f} MiB with its workers); load average now "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"  {result['summary']}")
    print(f"command: {result['command']}")


if __name__ == "__main__":
    main()
