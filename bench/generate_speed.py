"""Decode speed on the CPU: minimind's decoder against its plain form and against llama.cpp, in one run.

    python bench/generate_speed.py                      # default 26M shape, random weights, ~3 minutes
    python bench/generate_speed.py --threads 1 --repeats 5
    python bench/generate_speed.py --hidden_size 640 --use_moe   # MiniMind2-MoE's shape
    python bench/generate_speed.py --model_family minimind3 --hidden_size 768   # MiniMind-3's default shape (64M)
    python bench/generate_speed.py --model output/sft/final --eval_data data/sft_eval.jsonl --eval_samples 100

Engines, each on the same model and the same prompt (--prompt_len tokens), --new_tokens greedy new
tokens with no eos stop, taking turns (one run of each per round, --repeats rounds), medians:
    plain            the decode loop before issue 30: the model's forward over model.py's KVCache
                     (bench/plain_decoding.py), what `generate` ran before
    ours             minimind's decoder (inference/decoding.py): fused float32 weights in the layout that
                     streams fastest here (inference/weights.py; one row reads the copy measured
                     fastest as the model was prepared: printed)
    ours int8        the same with --quantize int8 (int8 weights; on a CPU with VNNI the activations are
                     quantized too, each row on its own; weights.Int8Product)
    llama.cpp f32    llama-cpp-python on our own GGUF export of the same weights (minimind export --to gguf),
    llama.cpp q8_0   and on the --quantize q8_0 export, through its own generate loop
    ours/llama.cpp   minimind's decoder with llama.cpp computing its passes (--backend llama.cpp:
    ours/llama q8_0  inference/llama_cpp_backend.py), float32 and q8_0 (--quantize int8)
                     (the last four only when llama_cpp is importable: the ecosystem extra)
Then batch 8 (prompts of different lengths) for the plain loop, ours, ours int8 and ours/llama.cpp. Printed: tokens/s,
the ratios against llama.cpp and against our batch 1, whether the greedy tokens agree, int8's logit
error, and with --model, int8's cost in held-out perplexity and exact match (minimind eval's figures
on --eval_data, float32 against int8).
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minimind.data.tokenizer import load_tokenizer
from minimind.inference.decoding import generate, right_pad
from minimind.inference.loading import load_for_inference
from minimind.inference.prepared import prepare
from minimind.inference.weights import quantize_linears
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/plain_decoding.py, however this is started
from plain_decoding import plain_generate  # noqa: E402


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def llama_cpp_engines(model, tokenizer, prompt, new_tokens, threads, folder):
    """{name: run()} for llama.cpp on f32 and q8_0 GGUF exports of `model`; {} without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not installed (pip install llama-cpp-python, or the ecosystem extra); skipped")
        return {}, {}
    from minimind.interop.export import export

    engines, tokens = {}, {}
    for name, quantize in (("llama.cpp f32", None), ("llama.cpp q8_0", "q8_0")):
        out = Path(folder) / name.split()[1]
        export(model, tokenizer, "gguf", out, quantize=quantize)
        llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=len(prompt) + new_tokens + 8,
                              n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

        def run(llm=llm):
            llm.reset()
            out = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
                out.append(token)
                if len(out) == new_tokens:
                    return out
        engines[name], tokens[name] = run, run()
    return engines, tokens


def llama_cpp_backends(model, tokenizer, quantizes=(None, "int8")):
    """{name: LlamaCppModel} for --backend llama.cpp, float32 (None) and q8_0 ("int8"); {} without llama_cpp."""
    from minimind.errors import UserError
    from minimind.inference.llama_cpp_backend import LlamaCppModel

    try:
        return {"ours/llama q8_0" if quantize else "ours/llama.cpp": LlamaCppModel(model, tokenizer, quantize)
                for quantize in quantizes}
    except UserError:  # llama_cpp is not installed (llama_cpp_engines said so)
        return {}


def first_difference(model, prompt, reference, other):
    """Where two greedy decodes part, and by how much the float32 model's two likeliest tokens were
    apart there: llama.cpp's logits differ from ours by up to ~2e-3 (a random 5M model, growing with
    the position; the same with float32 keys and values), so a near tie can go the other way."""
    index = next(i for i, (a, b) in enumerate(zip(reference, other)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reference[:index]])).logits[0, -1].float()
    top = logits.topk(2).values
    return (f"tokens differ from token {index} on, where the float32 model's two likeliest were "
            f"{float(top[0] - top[1]):.1e} apart (logits' std {float(logits.std()):.2f})")


def median_rates(engines, tokens_per_run, repeats):
    """Every engine once per round, `repeats` rounds (a load that drifts reaches all alike) -> median tokens/s."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            times[name].append(timed(run))
    return {name: tokens_per_run / statistics.median(seconds) for name, seconds in times.items()}


def quality(model_path, eval_data, samples):
    """minimind eval's figures on eval_data for the float32 model, its int8 form and, with llama_cpp,
    q8_0 through llama.cpp (its answers; the perplexity there is the float32 model's): {name: report}."""
    from minimind.inference.evaluation import evaluate

    model, tokenizer = load_for_inference(model_path, device="cpu")
    candidates = {"float32": (model, None), "int8": (quantize_linears(copy.deepcopy(model)), None)}
    q8_0 = llama_cpp_backends(model, tokenizer, quantizes=("int8",)).get("ours/llama q8_0")
    if q8_0 is not None:
        candidates["llama.cpp q8_0"] = (model, q8_0)
    reports = {}
    for name, (candidate, decoder) in candidates.items():
        start = time.perf_counter()
        reports[name] = evaluate(candidate, tokenizer, eval_data, max_seq_len=512, max_samples=samples, decoder=decoder)
        reports[name]["seconds"] = time.perf_counter() - start
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    parser.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0 = torch's default)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--model_family", choices=["minimind2", "minimind3"], default="minimind2",
                        help="the family of the random model (its defaults: heads, widths, q/k norms)")
    parser.add_argument("--use_moe", action="store_true", help="a random mixture of experts (the family's router)")
    parser.add_argument("--model", default=None, help="a trained model instead of random weights of the shape above")
    parser.add_argument("--eval_data", default="data/sft_eval.jsonl",
                        help="with --model: held-out data for int8's cost in perplexity and exact match")
    parser.add_argument("--eval_samples", type=int, default=100, help="records of --eval_data (0 = all)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    if args.model:
        model, tokenizer = load_for_inference(args.model, device="cpu")
    else:
        shape = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
        model = MiniMindForCausalLM(MiniMindConfig(**shape, model_family=args.model_family, use_moe=args.use_moe)).eval()
        tokenizer = load_tokenizer()
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters()) / 1e6
    prompt = torch.randint(3, vocab, (args.prompt_len,)).tolist()
    n = args.new_tokens
    source = args.model or f"random weights, {args.model_family}" + (", experts" if args.use_moe else "")
    print(f"model: {params:.1f}M parameters ({source}), float32, {threads} threads; "
          f"prompt {args.prompt_len} tokens, {n} new tokens, greedy, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f}")

    ours, ours_int8 = prepare(model), prepare(model, "int8")
    print(f"weights read per token: float32 {ours.weight_bytes() / 1e6:.1f} MB, int8 {ours_int8.weight_bytes() / 1e6:.1f} MB")
    if ours.few_rows is not None:  # measured as the model was prepared (weights.settle_few_rows)
        print(f"ours float32: {ours.few_rows}")

    def ours_run(prepared, prompts):
        return lambda: generate(prepared, prompts, max_new_tokens=n, eos_token_id=[]).token_ids

    engines = {"plain": lambda: plain_generate(model, [prompt], n)[0], "ours": lambda: ours_run(ours, [prompt])()[0],
               "ours int8": lambda: ours_run(ours_int8, [prompt])()[0]}
    with tempfile.TemporaryDirectory() as folder:
        peers, peer_tokens = llama_cpp_engines(model, tokenizer, prompt, n, threads, folder)
        engines.update(peers)
        backends = llama_cpp_backends(model, tokenizer)
        engines.update({name: (lambda decoder=decoder: ours_run(decoder, [prompt])()[0])
                        for name, decoder in backends.items()})
        tokens = {name: run() for name, run in engines.items()}  # a warm-up each, and their tokens
        tokens.update(peer_tokens)
        rates = median_rates(engines, n, args.repeats)
    for name, rate in rates.items():
        print(f"batch 1   {name:15s} {rate:8.1f} tokens/s")
    print(f"same greedy tokens as plain: ours {tokens['ours'] == tokens['plain']}"
          + "".join(f", {name} {tokens[name] == tokens['plain']}" for name in [*peers, *backends]
                    if "q8_0" not in name)
          + f"; int8 agrees with float32 on {agreement(tokens['ours int8'], tokens['ours'])} of {n} tokens")
    for name in [*peers, *backends]:
        if "q8_0" not in name and tokens[name] != tokens["plain"]:
            print(f"  {name}: {first_difference(model, prompt, tokens['plain'], tokens[name])}")
    print(f"ratio     ours / plain            {rates['ours'] / rates['plain']:8.2f}x")
    if peers:
        print(f"ratio     ours / llama.cpp f32    {rates['ours'] / rates['llama.cpp f32']:8.2f}x   (goal 0.6x)")
        print(f"ratio     ours int8 / llama q8_0  {rates['ours int8'] / rates['llama.cpp q8_0']:8.2f}x   (goal 0.6x)")
    if backends:
        print(f"ratio     ours/llama.cpp / llama.cpp f32    {rates['ours/llama.cpp'] / rates['llama.cpp f32']:8.2f}x   "
              f"(--backend llama.cpp)")
        print(f"ratio     ours/llama q8_0 / llama.cpp q8_0  {rates['ours/llama q8_0'] / rates['llama.cpp q8_0']:8.2f}x   "
              f"(--backend llama.cpp --quantize int8)")

    lengths = [max(args.prompt_len - 3 * i, 1) for i in range(args.batch)]
    prompts = [torch.randint(3, vocab, (length,)).tolist() for length in lengths]
    batch_engines = {"plain": lambda: plain_generate(model, prompts, n), "ours": ours_run(ours, prompts),
                     "ours int8": ours_run(ours_int8, prompts),
                     **{name: ours_run(decoder, prompts) for name, decoder in backends.items()}}
    for run in batch_engines.values():
        run()
    batch_rates = median_rates(batch_engines, args.batch * n, args.repeats)
    for name, rate in batch_rates.items():
        print(f"batch {args.batch}   {name:15s} {rate:8.1f} tokens/s   ({rate / rates[name]:.2f}x its batch 1; "
              f"prompts of {min(lengths)}-{max(lengths)} tokens)")
    print(f"int8 logits: {logit_error(model, ours, ours_int8, prompts)}")
    if args.model:
        reports = quality(args.model, args.eval_data, args.eval_samples or None)
        print(f"int8's cost on {args.eval_data} ({args.eval_samples or 'all'} records; through llama.cpp the "
              f"perplexity is the float32 model's, the answers q8_0's):")
        for name, report in reports.items():
            print(f"  {name:15s} {describe_quality(report)}  ({report['seconds']:.0f} s)")
        answers = {name: [detail.get("answer") for detail in report.get("details", [])] for name, report in reports.items()}
        for name in list(reports)[1:]:
            if answers[name]:
                same = sum(a == b for a, b in zip(answers["float32"], answers[name]))
                print(f"  {name}'s greedy answer is float32's on {same} of {len(answers[name])} questions")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def agreement(a, b):
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def logit_error(model, ours, ours_int8, prompts):
    """int8 against float32 on the prompts' last positions: the largest difference over the logits' std."""
    lengths = [len(p) for p in prompts]
    ids = right_pad([torch.tensor(p) for p in prompts])
    logits = ours.prefill(ours.new_cache(len(prompts), max(lengths)), list(range(len(prompts))), ids, lengths=lengths)
    int8 = ours_int8.prefill(ours_int8.new_cache(len(prompts), max(lengths)), list(range(len(prompts))), ids,
                             lengths=lengths)
    same = (logits.argmax(-1) == int8.argmax(-1)).sum().item()
    return (f"max |int8 - float32| = {(int8 - logits).abs().max():.4f} (logits' std {logits.std():.3f}); "
            f"same next token on {same} of {len(prompts)} prompts")


def describe_quality(report):
    if report["stage"] == "pretrain":
        return f"perplexity {report['perplexity']:.3f}"
    if report["stage"] == "sft":
        matched = sum(r["match"] for r in report["details"])
        return (f"answer perplexity {report['answer_perplexity']:.4f}, exact match {report['exact_match']:.1%} "
                f"({matched}/{report['answers']})")
    return f"exact match {report.get('exact_match', float('nan')):.1%}"


if __name__ == "__main__":
    sys.exit(main())
