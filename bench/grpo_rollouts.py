"""GRPO's rollouts on the demo prompts: minimind's decoder against the plain decode loop, in one run.

    python bench/grpo_rollouts.py                                  # random weights of the guide's GRPO shape
    python bench/grpo_rollouts.py --model output/sft_s/final       # the SFT model GRPO starts from
    python bench/grpo_rollouts.py --steps 10 --threads 1

What one GRPO step samples (training/grpo.py's sample_answers): --batch_size prompts of
data/grpo_train.jsonl, each answered --group_size times at --temperature, at most --max_new_tokens
tokens, stopping at <|im_end|>; the defaults are the training guide's GRPO run (8 prompts x 8 answers,
temperature 0.7, 20 tokens). Each step's rollout runs through
    plain       the decode loop before issue 30 (bench/plain_decoding.py): the model's forward over its KVCache
    ours        decoding.generate, preparing the weights again at every rollout as GRPO does
    ours int8   the same with --grpo_quantize int8
taking turns on the same prompts. Printed: answer tokens per second of each (median over the steps)
and the ratio to plain. Random weights never stop at <|im_end|>, so every answer is full length; a
trained model's stop earlier and the rates differ, the ratio much less.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from minimind.data.datasets import PromptDataset
from minimind.data.tokenizer import load_tokenizer
from minimind.inference.decoding import generate
from minimind.inference.loading import load_for_inference
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/plain_decoding.py, however this is started
from plain_decoding import plain_generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a trained model [random weights of the shape below]")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_hidden_layers", type=int, default=6)
    parser.add_argument("--data", default=str(ROOT / "data" / "grpo_train.jsonl"),
                        help="GRPO prompts [the bundled data/grpo_train.jsonl, from any working directory]")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per step")
    parser.add_argument("--group_size", type=int, default=8, help="answers per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="rollouts timed for each decoder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model, tokenizer = load_for_inference(args.model, device="cpu")
    else:
        tokenizer = load_tokenizer()
        model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                                   num_attention_heads=8, num_key_value_heads=2)).eval()
    prompts = [item["input_ids"].tolist() for item in PromptDataset([args.data], tokenizer, 512)]
    eos = tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {params:.2f}M parameters ({args.model or 'random weights'}), {torch.get_num_threads()} threads; "
          f"{args.batch_size} prompts x {args.group_size} answers, temperature {args.temperature}, at most "
          f"{args.max_new_tokens} tokens; {args.steps} steps each; load average {os.getloadavg()[0]:.2f}")

    def rollout(step, decoder):
        batch = prompts[(step * args.batch_size) % len(prompts):][:args.batch_size]
        rows = [ids for ids in batch for _ in range(args.group_size)]
        generator = torch.Generator().manual_seed(step)
        start = time.perf_counter()
        if decoder == "plain":
            answers = plain_generate(model, rows, args.max_new_tokens, args.temperature, eos_ids={eos},
                                     generator=generator)
        else:
            answers = generate(model, rows, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               tokenizer=tokenizer, eos_token_id=eos, generator=generator,
                               quantize="int8" if decoder == "ours int8" else None).token_ids
        return sum(len(answer) for answer in answers), time.perf_counter() - start

    decoders = ("plain", "ours", "ours int8")
    for decoder in decoders:
        rollout(0, decoder)  # warm-up
    rates = {decoder: [] for decoder in decoders}
    for step in range(1, args.steps + 1):
        for decoder in decoders:
            tokens, seconds = rollout(step, decoder)
            rates[decoder].append(tokens / seconds)
    plain = statistics.median(rates["plain"])
    for decoder in decoders:
        rate = statistics.median(rates[decoder])
        print(f"{decoder:10s} {rate:8.1f} answer tokens/s   {rate / plain:5.2f}x plain   "
              f"(steps: {', '.join(f'{r:.0f}' for r in rates[decoder])})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
