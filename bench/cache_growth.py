"""What the key/value cache's growth costs a server while one long prompt is read: the pauses of the
batch when the buffers double, and the memory they take.

    python bench/cache_growth.py                    # 16 rows, a 20,000-token prompt, the 26M shape, ~20 s

Each way fills row 0 of a server-sized cache (`--slots` rows, 8 layers, 2 key/value heads of 64,
float32, at most `--limit` tokens) with `--prompt` tokens in 512-token chunks, in a fresh process (for
its peak memory), and prints the longest pause, all pauses together and the peak resident memory:
- before: growing zeroed every row's new width and copied every row's old width (the cache until
  2026-12-06, kept here as the baseline);
- now: kv_cache.SlotCache, which copies what each row holds and zeroes only what a step will read.
"""
import argparse
import resource
import subprocess
import sys
import time

import torch

from minimind.inference.kv_cache import SlotCache


class GrowingAsBefore(SlotCache):
    def reserve(self, columns):
        if columns <= self.capacity:
            return
        capacity = min(self.limit, max(columns, 2 * self.capacity))
        for layer, old in enumerate(self.buffers):
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, :old.shape[3]] = old
            self.buffers[layer] = new


def fill(way, slots, limit, prompt):
    """Row 0 filled chunk by chunk -> (longest pause, all pauses) in seconds."""
    cache = (GrowingAsBefore if way == "before" else SlotCache)(8, slots, 2, 64, torch.float32, "cpu", limit)
    chunk = torch.randn(1, 4, 512, 64)
    pauses = []
    for start in range(0, prompt, 512):
        size = min(512, prompt - start)
        began = time.perf_counter()
        cache.reserve(start + size)
        pauses.append(time.perf_counter() - began)
        for layer in range(8):
            cache.store_chunk(layer, [0], start, chunk[:, :, :size])
        cache.written([0], start + size)
        cache.lengths[0] = start + size
    return max(pauses), sum(pauses)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=16, help="the server's --max_batch_size")
    parser.add_argument("--limit", type=int, default=20064, help="the server's --max_model_len")
    parser.add_argument("--prompt", type=int, default=20000)
    parser.add_argument("--way", choices=["before", "now"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        longest, total = fill(args.way, args.slots, args.limit, args.prompt)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{longest:.3f} {total:.3f} {peak:.0f}")
        return
    print(f"{args.slots} rows of at most {args.limit} tokens, one prompt of {args.prompt} tokens")
    print("| way | longest pause | all pauses | peak resident memory |\n| --- | ---: | ---: | ---: |")
    results = {}
    for way in ("before", "now"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--slots", str(args.slots), "--limit",
                              str(args.limit), "--prompt", str(args.prompt)], capture_output=True, text=True, check=True)
        results[way] = [float(value) for value in out.stdout.split()]
        longest, total, peak = results[way]
        print(f"| {way} | {longest * 1000:.0f} ms | {total * 1000:.0f} ms | {peak:.0f} MiB |")
    before, now = results["before"], results["now"]
    print(f"now / before: longest pause {now[0] / before[0]:.2f}x, memory {now[2] / before[2]:.2f}x")


if __name__ == "__main__":
    main()
