"""How many CPU threads a decoding pass uses, on a CPU where other work may hold some of the cores.

A decoding step is ~400 short products. On an idle machine every thread makes it faster (2 AVX-512
cores, one row: 104 against 76 tokens/s, with OpenMP's waiting threads spinning briefly); beside a
process that keeps a core busy, threads that wait for each other lose most. So the decoders time both
counts as they run and use the faster one: the server's engine (serving/engine.py) and the decode
loop of `generate`, `chat` and `eval` (decoding.decode, through PreparedModel.threads).
"""
import math
import time

import torch

# At most this share of the decoding time goes to trying the slower thread count.
EXPLORE_SHARE = 0.02


class ThreadPolicy:
    """How many CPU threads each decoding pass uses, on a CPU where the same cores may also run other
    work: the server's event loop that streams every token (and, on a small machine, the clients),
    or other processes.

    A decoding step of a given number of rows uses the count, `few` (one fewer than the cores) or
    `many` (all of them), that has decoded that many rows faster here, timed as it runs (an
    average per number of rows), and the other one every `explore`-th step (rarer where it is much
    slower: explore_interval), so that a change of load is seen: on an idle machine every thread is
    faster (2 AVX-512 cores, the engine alone, one row: 104 against 76 tokens/s); beside processes
    that keep the cores busy, threads that wait for each other lose most (the server, one client:
    33.9 tokens/s on 2 threads, 45.6 on one, 47.8 timed).
    A prompt is read on every thread (use_all), also while other requests stream: reading it on
    `few` then, as the server did before, made bench/serve_load.py's 20,000-token prompt take 62.6 s
    instead of 47.8 and 8 clients' tokens/s 0.9x, while the short requests' first tokens during the
    long prompt stayed far under a second either way (236 and 246 ms at most). docs/benchmarks.md,
    "Serving under load", has the measurements.
    """

    def __init__(self, few, many, explore=32, clock=time.perf_counter):
        self.few, self.many, self.explore, self.clock = few, max(few, many), explore, clock
        self.seconds, self.timed_steps = {}, 0  # (rows, threads) -> [steps seen, average seconds]
        self.steps = {few: 0, self.many: 0}  # decoding steps per thread count

    def use_all(self):
        """Every thread: for reading a prompt, and after decoding (torch's count as it was found)."""
        set_threads(self.many)

    def timed(self, rows, run):
        """run() with the threads chosen for a step of `rows` decoding rows; its time is recorded."""
        count = self.choose(rows)
        set_threads(count)
        start = self.clock()
        result = run()
        self.record(rows, count, self.clock() - start)
        return result

    def choose(self, rows):
        if self.few == self.many:
            return self.few
        self.timed_steps += 1
        unmeasured = [count for count in (self.many, self.few)   # the first step of a count is warm-up
                      if self.seconds.get((rows, count), [0])[0] < 2]
        if unmeasured:
            count = unmeasured[0]
        else:
            best, other = sorted((self.few, self.many), key=lambda count: self.seconds[rows, count][1])
            count = other if self.timed_steps % self.explore_interval(rows, best, other) == 0 else best
        self.steps[count] += 1
        return count

    def explore_interval(self, rows, best, other):
        """Every how many steps the slower count is tried: every `explore`-th, or rarer where it is so
        much slower that trying it would cost more than EXPLORE_SHARE of the time (beside a busy
        process, 2 threads took 3x as long as one for 8 rows). A best count that turns slower is
        left at once; only a slower one that turns faster waits for its turn to be seen."""
        slower_by = self.seconds[rows, other][1] / self.seconds[rows, best][1] - 1
        return max(self.explore, math.ceil(slower_by / EXPLORE_SHARE))

    def record(self, rows, count, seconds):
        seen = self.seconds.setdefault((rows, count), [0, seconds])
        seen[0] += 1
        if seen[0] == 2:
            seen[1] = seconds
        elif seen[0] > 2:
            seen[1] += 0.1 * (seconds - seen[1])


def set_threads(count):
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def cpu_thread_policy(device):
    """A ThreadPolicy between one thread fewer than torch's count and all of them, for decoding on
    `device`; None on a GPU or with a single thread (nothing to choose)."""
    count = torch.get_num_threads()
    if torch.device(device).type != "cpu" or count < 2:
        return None
    return ThreadPolicy(count - 1, count)
