"""Greedy decode speed on the CPU: our loop (minimind.generation) against transformers' generate().

    python bench/generate_speed.py                 # default 26M shape, about a minute
    python bench/generate_speed.py --new_tokens 256 --repeats 5

Both paths run the same model object (random weights: speed does not depend on their values) on
the same prompt and produce the same number of new tokens (no eos stop), alternating, under
torch.inference_mode(); medians over the repeats. Prints tokens/s for each and the ratio, then the
batch-8 throughput of our loop (8 prompts of different lengths, left-padded).
"""
import argparse
import statistics
import time

import torch

from minimind.inference.decoding import generate
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def matrix_vector_products(model, tokens):
    """The unavoidable work of batch-1 decoding: each weight matrix times one vector, per token.
    No attention, norms or Python around it, so its speed bounds any decode loop on this machine."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    inputs = [torch.randn(1, module.in_features) for module in linears]
    for _ in range(tokens):
        for module, vector in zip(linears, inputs):
            torch.nn.functional.linear(vector, module.weight)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    # torch's default (one thread per core) is what `minimind generate` uses and is fastest on idle
    # cores; on a machine whose cores are busy with other jobs, OpenMP threads waiting on each other
    # were 10x slower there, and --threads 1 gives steadier numbers.
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    model = MiniMindForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    print(f"model: {params:.1f}M parameters (random weights), float32, {torch.get_num_threads()} threads; "
          f"prompt {args.prompt_len} tokens, {n} new tokens, greedy, median of {args.repeats}")

    def ours():
        out = generate(model, prompt, max_new_tokens=n, eos_token_id=[])
        assert len(out.token_ids[0]) == n

    def transformers_generate():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + n

    with torch.inference_mode():
        # Same tokens from both paths, and a warm-up for each.
        ours_ids = generate(model, prompt, max_new_tokens=16, eos_token_id=[]).token_ids[0]
        hf_ids = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, args.prompt_len:].tolist()
        print(f"same greedy tokens as transformers: {ours_ids == hf_ids}")
        ours_times, hf_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(ours))
            hf_times.append(timed(transformers_generate))
        ours_speed = n / statistics.median(ours_times)
        hf_speed = n / statistics.median(hf_times)
        print(f"batch 1   ours          {ours_speed:8.1f} tokens/s")
        print(f"batch 1   transformers  {hf_speed:8.1f} tokens/s")
        print(f"batch 1   ratio         {ours_speed / hf_speed:8.2f}x")
        floor = n / statistics.median([timed(lambda: matrix_vector_products(model, n)) for _ in range(args.repeats)])
        print(f"batch 1   bound         {floor:8.1f} tokens/s (only the matrix-vector products of one token "
              f"through every weight: the memory-bandwidth limit here)")

        lengths = [args.prompt_len - 3 * i for i in range(args.batch)]
        prompts = [torch.randint(3, config.vocab_size, (max(length, 1),)).tolist() for length in lengths]
        generate(model, prompts, max_new_tokens=8, eos_token_id=[])  # warm-up
        batch_times = [timed(lambda: generate(model, prompts, max_new_tokens=n, eos_token_id=[]))
                       for _ in range(args.repeats)]
        print(f"batch {args.batch}   ours          {args.batch * n / statistics.median(batch_times):8.1f} tokens/s "
              f"(all rows together; prompts of {min(lengths)}-{max(lengths)} tokens, left-padded)")


if __name__ == "__main__":
    main()
