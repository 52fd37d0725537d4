"""The `minimind` command: one entry point with verbs, each a thin layer over the library.

    minimind train ...        (same as python train.py)
    minimind tokenizer train ...
    minimind generate | chat | eval | merge | export | serve ...

Every verb's flags are declared here (train's in train_config.py) and checked before the library
is imported: `--help` and a bad value answer at once, without loading torch. A UserError from the
library becomes one clear line and exit code 2.
"""
import importlib
import os
import sys

from .errors import UserError
from .flags import Parser, add_boolean, bounded

DTYPES = ["float32", "bfloat16", "float16"]
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS = 0.85, 0.85, 512  # the original eval script's


# ---------------------------------------------------------------- flags shared by the inference verbs

def add_model_arguments(parser):
    """--model, --tokenizer, --adapter, --dtype, --device, and the shape flags of a bare .pth."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="output/final/, a .pth, a .safetensors file or a HF-style directory")
    group.add_argument("--tokenizer", default=None, help="tokenizer folder [the one saved with the model]")
    group.add_argument("--adapter", default=None, help="a LoRA adapter directory to apply to the model [none]")
    group.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="weights and activations; bfloat16 halves the memory read per token")
    group.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, mps ...")
    group.add_argument("--num_threads", type=bounded(int, 1, 1024), default=None,
                       help="CPU threads for the model's arithmetic [torch's default: one per core]")
    # train.py's flag names (the seed's), for a .pth without config.json beside it
    group.add_argument("--hidden_size", type=bounded(int, 8, 65536), help="shape of a bare .pth [from the file]")
    group.add_argument("--num_layers", type=bounded(int, 1, 1024), help="shape of a bare .pth [from the file]")
    group.add_argument("--num_heads", type=bounded(int, 1, 1024), help="shape of a bare .pth [8]")
    group.add_argument("--num_key_value_heads", type=bounded(int, 1, 1024), help="shape of a bare .pth [from the file]")
    add_boolean(group, "--use_moe", default=None, help="shape of a bare .pth: mixture of experts [from the file]")


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


# ---------------------------------------------------------------- one parser per verb

def generate_parser():
    parser = Parser(prog="minimind generate", description="Continue a prompt with a trained model.")
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue ('' starts from nothing)")
    add_boolean(parser, "--chat", help="wrap the prompt in the chat template as a user turn")
    parser.add_argument("--system", default=None, help="system message (with --chat) [the template's default]")
    add_open_thinking(parser)
    add_sampling_arguments(parser)
    return parser


def chat_parser():
    parser = Parser(prog="minimind chat",
                    description="Chat with a trained model. Type a message and Enter; /reset forgets the "
                                "conversation, /exit (or Ctrl-D) quits.")
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message [the template's default]")
    parser.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=None,
                        help="context window for the history [the model's max_position_embeddings]")
    add_open_thinking(parser)
    add_sampling_arguments(parser)
    return parser


def eval_parser():
    from_doc = "Perplexity, exact match on conversations, preferences on DPO pairs (docs/generation.md)."
    parser = Parser(prog="minimind eval", description=from_doc)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="a pretraining, SFT or preference (DPO) data file (.jsonl, .json, .txt, .parquet)")
    parser.add_argument("--report", default=None, help="JSON report path [eval_report.json beside the model]")
    parser.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=512, help="evaluation window in tokens")
    parser.add_argument("--batch_size", type=bounded(int, 1, 1 << 16), default=8, help="sequences per forward pass")
    parser.add_argument("--max_samples", type=bounded(int, 1, 1 << 40), default=None,
                        help="evaluate only the first N records [all]")
    add_boolean(parser, "--skip_bad_records", help="skip malformed records (and report them) instead of stopping")
    return parser


def merge_parser():
    parser = Parser(prog="minimind merge", description="Fold a LoRA adapter into its base model.")
    parser.add_argument("--model", "--base", required=True,
                        help="the base model: a HF-style directory or a .pth (--base is the same flag)")
    parser.add_argument("--adapter", required=True,
                        help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output_dir", "--out", required=True,
                        help="where to write the merged HF-style directory (--out is the same flag)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with it [the base's, else the bundled one]")
    return parser


def serve_parser():
    parser = Parser(prog="minimind serve",
                    description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                "/v1/completions, /v1/models) with a chat page at /. Concurrent requests are "
                                "decoded together in one batch (docs/serving.md).")
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to listen on")
    group.add_argument("--served_model_name", default=None,
                       help="the model id clients send and /v1/models lists [the --model argument]")
    group.add_argument("--max_batch_size", type=bounded(int, 1, 4096), default=16, help="requests decoded together at most")
    group.add_argument("--max_queue", type=bounded(int, 0, 1 << 20), default=64,
                       help="requests that may wait for a place in the batch; beyond them the server answers 503")
    group.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=None,
                       help="context per request, prompt + reply tokens [the model's max_position_embeddings]")
    return parser


def tokenizer_parser():
    parser = Parser(prog="minimind tokenizer", description="Train a byte-level BPE tokenizer on your text.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    train = verbs.add_parser("train", help="train a byte-level BPE tokenizer on data files",
                             formatter_class=parser.formatter_class)
    train.add_argument("--data", nargs="+", required=True,
                       help="data files or glob patterns (.jsonl, .json, .txt; pretraining, SFT or DPO)")
    train.add_argument("--vocab_size", type=bounded(int, 259, 1 << 20), default=6400,
                       help="tokens in the vocabulary, the 256 bytes and 3 special tokens included")
    train.add_argument("--output_dir", "--out", required=True,
                       help="folder for tokenizer.json and tokenizer_config.json (--out is the same flag)")
    add_boolean(train, "--skip_bad_records", help="skip malformed records (and report them) instead of stopping")
    return parser


EXPORT_TARGETS = ("llama", "qwen3", "gguf")


def export_parser():
    parser = Parser(prog="minimind export", description="Write a trained model in the formats other tools run "
                                                        "(docs/export.md).")
    add_model_arguments(parser)
    parser.add_argument("--to", required=True, choices=EXPORT_TARGETS,
                        help="llama: a directory transformers opens alone (Llama; Mixtral, GraniteMoeShared or "
                             "Qwen2-MoE for MoE models); qwen3: the same for models with q/k norms; gguf: one file "
                             "for llama.cpp and Ollama")
    parser.add_argument("--output_dir", required=True, help="folder to write (created; same-named files replaced)")
    parser.add_argument("--quantize", choices=["q8_0"], default=None,
                        help="gguf only: 8-bit blocks for the matrices, norms and router stay float32 [none]")
    return parser


def train_parser():
    from .train_config import build_parser
    return build_parser(prog="minimind train")


# verb -> (its flags, module, function taking the parsed flags, one-line help)
VERBS = {
    "train": (train_parser, "minimind.trainer", "train", "train a model (pretraining, SFT, DPO, LoRA); same as python train.py"),
    "tokenizer": (tokenizer_parser, "minimind.tokenizer", "main", "train a byte-level BPE tokenizer on your text"),
    "generate": (generate_parser, "minimind.generation", "main_generate", "continue a prompt with a trained model"),
    "chat": (chat_parser, "minimind.generation", "main_chat", "chat with a trained model in the terminal"),
    "eval": (eval_parser, "minimind.evaluation", "main", "perplexity and exact-match accuracy on a data file"),
    "merge": (merge_parser, "minimind.lora", "main_merge", "merge a LoRA adapter into its base model"),
    "export": (export_parser, "minimind.export", "main",
               "write the model for transformers (Llama layout), llama.cpp or Ollama (GGUF)"),
    "serve": (serve_parser, "minimind.serving.server", "main",
              "an OpenAI-compatible HTTP server and chat page; concurrent requests decode in one batch"),
}


def parse(verb, argv, prog=None):
    """A verb's flags, checked: a TrainConfig for train, an argparse namespace for the others."""
    if verb == "train":
        from .train_config import parse_train_args
        return parse_train_args(argv, prog=prog or "minimind train")
    return VERBS[verb][0]().parse_args(argv)


def usage():
    lines = ["usage: minimind VERB [options]   (minimind VERB --help for details)", "", "verbs:"]
    lines += [f"  {verb:<10} {entry[-1]}" for verb, entry in VERBS.items()]
    return "\n".join(lines)


def run_user_command(function, argument, keep_result=False):
    """Run a command; a UserError becomes one line on stderr and exit code 2."""
    try:
        result = function(argument)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return result if keep_result else result or 0


def main(argv=None, prog=None):
    """`minimind VERB ...`; train.py calls it with prog="train.py"."""
    # Threads that wait for work sleep instead of spinning: on a busy machine, spinning threads take
    # the cores the working ones need and a 2-thread step ran 2-5x slower than a 1-thread one
    # (docs/benchmarks.md, "A busy CPU"). Set before torch starts its OpenMP pool; a value the user
    # exported wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    _, module_name, function_name, _ = VERBS[verb]
    # Flags first, so that --help and a bad value answer before torch is imported.
    arguments = run_user_command(lambda argv: parse(verb, argv, prog), rest, keep_result=True)
    if isinstance(arguments, int):
        return arguments
    import transformers
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars are noise in our output
    function = getattr(importlib.import_module(module_name), function_name)
    return run_user_command(function, arguments)


if __name__ == "__main__":
    sys.exit(main())
