"""How the decoding commands' threads wait and how many they use: `minimind generate`, `chat` and
`eval` decode with OpenMP's waiting threads spinning briefly (GOMP_SPINCOUNT=10000) and each step
on the thread count that has been faster (inference/threads.py, ThreadPolicy); before, their
threads slept at once (OMP_WAIT_POLICY=PASSIVE) on a fixed count. This times the three ways on an
idle machine and beside processes that keep cores busy (`while True: pass`).

    python bench/decode_threads.py                       # batch 1 and 8, idle and beside 1 busy process, ~3 min
    python bench/decode_threads.py --busy 0 1 2 --batches 1

Each measurement is a fresh process (OpenMP reads its waiting policy once, at start) that decodes
--new_tokens tokens after a 32-token prompt, default 26M shape, random weights, the commands'
default sampling, --repeats times after a warm-up; it prints the median tokens/s, and each way's
ratio to the sleeping threads' (the previous setting) in the same load.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

WAYS = {  # name: (environment, thread policy)
    "asleep, fixed count (before)": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    "short spin, fixed count": ({"GOMP_SPINCOUNT": "10000"}, False),
    "short spin, timed count (now)": ({"GOMP_SPINCOUNT": "10000"}, True),
}


def measure(batch, timed, new_tokens, repeats):
    """In this process: median tokens/s of `repeats` decodes (after a warm-up)."""
    import torch

    from minimind.inference.decoding import generate
    from minimind.inference.prepared import prepare
    from minimind.inference.settings import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
    from minimind.inference.threads import cpu_thread_policy
    from minimind.model.config import MiniMindConfig
    from minimind.model.model import MiniMindForCausalLM

    torch.manual_seed(0)
    decoder = prepare(MiniMindForCausalLM(MiniMindConfig()).eval())
    if timed:
        decoder.threads = cpu_thread_policy("cpu")
    prompt = torch.randint(0, decoder.config.vocab_size, (batch, 32))
    rates = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        generate(decoder, prompt, max_new_tokens=new_tokens, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P,
                 eos_token_id=[], seed=repeat)
        rates.append(batch * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def run_way(way, batch, args):
    environment, timed = WAYS[way]
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    command = [sys.executable, __file__, "--measure", str(batch), str(int(timed)),
               "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    result = subprocess.run(command, env={**env, **environment}, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1], help="busy processes beside the decoder")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure[0], bool(args.measure[1]), args.new_tokens, args.repeats))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    print("| busy processes | batch | way | tokens/s | vs asleep |\n| ---: | ---: | --- | ---: | ---: |")
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for batch in args.batches:
                rates = {way: run_way(way, batch, args) for way in WAYS}
                baseline = rates[next(iter(WAYS))]
                for way, rate in rates.items():
                    print(f"| {busy} | {batch} | {way} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
