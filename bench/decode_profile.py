"""Where one decoded token's time goes: the matrix products against everything else, for the plain
decode loop (the model's forward over its KVCache, what `generate` ran before issue 30) and for
minimind's decoder in float32 and int8.

    python bench/decode_profile.py                 # default 26M shape, 1 thread, ~1 minute
    python bench/decode_profile.py --threads 2

Each path decodes --tokens tokens after a 32-token prompt, --repeats times; the fastest repeat
counts (the least disturbed by other jobs). Then the same with every matrix product replaced by
an empty result of its shape: what remains is the rest of a token (norms, rotary embedding, cache
writes, attention, Python and dispatch). Times are CPU time of this process (time.process_time),
which other jobs on the machine disturb much less than wall time; with --threads 2 they add both
threads' time.
"""
import argparse
import os
import time
from unittest import mock

import torch

from minimind.inference import weights
from minimind.inference.prepared import prepare
from minimind.model.config import MiniMindConfig
from minimind.model.model import KVCache, MiniMindForCausalLM


def best_seconds_per_token(step, reset, tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        reset()
        start = time.process_time()
        for _ in range(tokens):
            step()
        best = min(best, (time.process_time() - start) / tokens)
    return best


def plain_path(model, prompt):
    state = {}

    def reset():
        state["cache"] = KVCache(capacity=512)
        model(prompt, cache=state["cache"], use_cache=True, logits_to_keep=1)

    def step():
        model(prompt[:, :1], cache=state["cache"], use_cache=True, logits_to_keep=1)
    return step, reset


def prepared_path(prepared, prompt):
    state = {}

    def reset():
        state["cache"] = prepared.new_cache(1, 512, capacity=512)
        prepared.prefill(state["cache"], [0], prompt)

    def step():
        prepared.step(state["cache"], prompt[0, :1])
    return step, reset


def empty_linear(self, x):
    return x.new_zeros(*x.shape[:-1], self.out_features)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig()).eval()
    prompt = torch.randint(3, 6400, (1, 32))
    print(f"default 26M shape, {args.threads} thread(s), CPU ms per token (best of {args.repeats}); "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| path | whole token | matrix products | the rest | tokens/s (CPU time) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    paths = {"plain (model forward + KVCache)": lambda: plain_path(model, prompt),
             "ours, float32": lambda: prepared_path(prepare(model), prompt),
             "ours, int8": lambda: prepared_path(prepare(model, "int8"), prompt)}
    with torch.inference_mode():
        for name, make in paths.items():
            step, reset = make()
            whole = best_seconds_per_token(step, reset, args.tokens, args.repeats)
            with mock.patch.object(torch.nn.Linear, "forward", empty_linear), \
                    mock.patch.object(weights.LinearWeights, "__call__", empty_linear):
                rest = best_seconds_per_token(step, reset, args.tokens, args.repeats)
            print(f"| {name} | {whole * 1e3:.2f} | {(whole - rest) * 1e3:.2f} | {rest * 1e3:.2f} | {1 / whole:.0f} |")


if __name__ == "__main__":
    main()
