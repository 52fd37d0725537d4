"""Flags shared by the verbs that run a trained model (generate, chat, eval, export, serve), and
their translation into the library's arguments: which model, on which device, how to sample.

The shape flags of a bare .pth (--hidden_size, --num_layers, ...) are train.py's own
(training.config.ModelSettings): one declaration, one map to the model's config fields.
"""
from ..errors import UserError
from ..inference.settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingSettings
from ..training.config import ModelSettings
from .flags import add_boolean, add_settings, bounded, from_namespace

DTYPES = ["float32", "bfloat16", "float16"]
BACKENDS = ["torch", "llama.cpp"]
SHAPE_FLAGS = ("hidden_size", "num_layers", "num_heads", "num_key_value_heads", "use_moe")


def add_model_arguments(parser, dtype_help="weights and activations; bfloat16 halves the memory read per token"):
    """--model, --tokenizer, --adapter, --dtype, --device, --num_threads, and the shape of a bare .pth."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="output/final/, a .pth, a .safetensors file or a HF-style directory")
    group.add_argument("--tokenizer", default=None, help="tokenizer folder [the one saved with the model]")
    group.add_argument("--adapter", default=None, help="a LoRA adapter directory to apply to the model [none]")
    group.add_argument("--dtype", default="float32", choices=DTYPES, help=dtype_help)
    group.add_argument("--device", default="auto",
                       help="where the model runs: auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, "
                            "cuda:1, mps")
    group.add_argument("--num_threads", type=bounded(int, 1, 1024), default=None,
                       help="CPU threads for the model's arithmetic [torch's default: one per core]")
    add_settings(group, ModelSettings, only=SHAPE_FLAGS,
                 helps={name: f"shape of a bare .pth without config.json [{default}]" for name, default in
                        (("hidden_size", "from the file"), ("num_layers", "from the file"), ("num_heads", "8"),
                         ("num_key_value_heads", "from the file"), ("use_moe", "from the file"))})


def add_decoder_arguments(parser):
    """--quantize and --backend: what computes the decoding passes, and with which weights."""
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weights for every matrix: a quarter of float32's bytes, 1.4-1.9x float32's decoding "
                             "speed on 2 CPU cores at the 26M shape (about even for a model whose float32 weights fit "
                             "the CPU's cache), at a small cost in accuracy (docs/generation.md#int8-weights); "
                             "q8_0 with --backend llama.cpp [none]")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what computes each decoding pass: torch (this package's decoder), or llama.cpp "
                             "(llama-cpp-python, the ecosystem extra, on a GGUF export of the model made at start; "
                             "CPU only; one reply 1.1-1.4x the torch decoder's speed on 2 cores at the 26M shape, "
                             "1.45-1.9x with --quantize int8, more for smaller models: docs/generation.md#llamacpp-"
                             "as-the-backend) [torch]")


def check_backend(args):
    """--backend llama.cpp: llama_cpp importable and the model on the CPU, said before anything loads."""
    if args.backend != "llama.cpp":
        return
    from ..inference.llama_cpp_backend import import_llama_cpp

    import_llama_cpp()
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--backend llama.cpp runs the model on the CPU (this package's llama.cpp build), "
                        f"not --device {args.device}; leave --device out or use --backend torch")


def add_open_thinking(parser):
    add_boolean(parser, "--open_thinking", help="let the model think first: MiniMind-3's chat template then opens "
                                                "a <think> block in the prompt (replies show it as 'thinking: ...')")


def add_sampling_arguments(parser, temperature=DEFAULT_TEMPERATURE):
    group = parser.add_argument_group("sampling (see docs/generation.md)")
    group.add_argument("--temperature", type=bounded(float, 0, 100), default=temperature,
                       help="softmax temperature; 0 = greedy (always the most likely token)")
    group.add_argument("--top_k", type=bounded(int, 0, 1 << 24), default=0,
                       help="sample among the k most likely tokens (0 = all)")
    group.add_argument("--top_p", type=bounded(float, 0, 1, low_open=True), default=DEFAULT_TOP_P,
                       help="nucleus sampling: the smallest set of likeliest tokens with this much probability (1 = all)")
    group.add_argument("--repetition_penalty", type=bounded(float, 0, 100, low_open=True), default=1.0,
                       help="> 1 discourages tokens already in the text (1 = off)")
    group.add_argument("--max_new_tokens", type=bounded(int, 1, 1 << 20), default=DEFAULT_MAX_NEW_TOKENS,
                       help="stop after this many new tokens")
    group.add_argument("--seed", type=bounded(int, 0, 2 ** 63 - 1), default=None,
                       help="makes sampling reproducible [a fresh random seed]")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable) [none]")


def load_model_from_flags(args, dtype=None, quantize=None, device=None):
    """The model and tokenizer that --model ... --device name; in --dtype unless `dtype` is given; with
    int8 weights when quantize="int8" (the verbs that decode pass their --quantize); on `device`
    instead of --device when given."""
    import torch

    from ..inference.loading import load_for_inference

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    shape = from_namespace(ModelSettings, args).architecture_overrides()
    dtype = getattr(torch, args.dtype) if dtype is None else dtype
    return load_for_inference(args.model, args.tokenizer, args.adapter, dtype=dtype, device=device or args.device,
                              quantize=quantize, **shape)


def load_decoder_from_flags(args, time_threads=False):
    """(model, decoder, tokenizer) for the verbs that decode: the model as load_model_from_flags gives
    it, and what decodes with it, prepared once: the torch decoder (prepared.PreparedModel, with int8
    weights for --quantize int8) or, with --backend llama.cpp, llama.cpp on a GGUF export of the
    float model (q8_0 for --quantize int8). time_threads (generate, chat, eval): on a CPU without
    --num_threads, each decoding step runs on one thread fewer than torch's count or on all of them,
    whichever has been faster (inference/threads.py; the server's engine times its own)."""
    if args.backend != "llama.cpp":
        from ..inference.prepared import prepare
        from ..inference.threads import cpu_thread_policy

        model, tokenizer = load_model_from_flags(args, quantize=args.quantize)
        decoder = prepare(model)
        if time_threads and not args.num_threads:
            decoder.threads = cpu_thread_policy(decoder.device)
        return model, decoder, tokenizer
    from ..inference.llama_cpp_backend import LlamaCppModel

    model, tokenizer = load_model_from_flags(args, device="cpu")
    return model, LlamaCppModel(model, tokenizer, args.quantize), tokenizer


def sampling_from_flags(args):
    """The sampling flags as SamplingSettings."""
    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop_strings=args.stop or [])
