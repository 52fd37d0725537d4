"""The `minimind` command: one entry point with verbs, each a thin layer over the library.

    minimind train ...        (same as python train.py)
    minimind tokenizer train ...
    minimind generate | chat | eval | merge ...

Every verb's flags are declared here (train's in train_config.py) and checked before the library
is imported: `--help` and a bad value answer at once, without loading torch. A UserError from the
library becomes one clear line and exit code 2.
"""
import importlib
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
    # train.py's flag names (the seed's), for a .pth without config.json beside it
    group.add_argument("--hidden_size", type=bounded(int, 8, 65536), help="shape of a bare .pth [from the file]")
    group.add_argument("--num_layers", type=bounded(int, 1, 1024), help="shape of a bare .pth [from the file]")
    group.add_argument("--num_heads", type=bounded(int, 1, 1024), help="shape of a bare .pth [8]")
    group.add_argument("--num_key_value_heads", type=bounded(int, 1, 1024), help="shape of a bare .pth [from the file]")
    add_boolean(group, "--use_moe", default=None, help="shape of a bare .pth: mixture of experts [from the file]")


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
    add_sampling_arguments(parser)
    return parser


def eval_parser():
    from_doc = ("Perplexity, exact match on conversations and GRPO prompts, preferences on DPO pairs "
                "(docs/generation.md).")
    parser = Parser(prog="minimind eval", description=from_doc)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="a pretraining, SFT, preference (DPO) or GRPO prompt data file (.jsonl, .json, .txt, "
                             ".parquet)")
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


def parse_train(argv, prog):
    from .train_config import parse_train_args
    return parse_train_args(argv, prog=prog)


def parse_with(make_parser):
    def parse(argv, prog):
        parser = make_parser()
        return parser.parse_args(argv)
    return parse


# verb -> (flags -> parsed arguments, module, function taking them, one-line help)
VERBS = {
    "train": (parse_train, "minimind.trainer", "train", "train a model (pretraining, SFT, DPO, GRPO, distillation, LoRA); same as python train.py"),
    "tokenizer": (parse_with(tokenizer_parser), "minimind.tokenizer", "main", "train a byte-level BPE tokenizer on your text"),
    "generate": (parse_with(generate_parser), "minimind.generation", "main_generate", "continue a prompt with a trained model"),
    "chat": (parse_with(chat_parser), "minimind.generation", "main_chat", "chat with a trained model in the terminal"),
    "eval": (parse_with(eval_parser), "minimind.evaluation", "main", "perplexity and exact-match accuracy on a data file"),
    "merge": (parse_with(merge_parser), "minimind.lora", "main_merge", "merge a LoRA adapter into its base model"),
}


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    parse, module_name, function_name, _ = VERBS[verb]
    # Flags first, so that --help and a bad value answer before torch is imported.
    arguments = run_user_command(lambda argv: parse(argv, prog or f"minimind {verb}"), rest, keep_result=True)
    if isinstance(arguments, int):
        return arguments
    import transformers
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars are noise in our output
    function = getattr(importlib.import_module(module_name), function_name)
    return run_user_command(function, arguments)


if __name__ == "__main__":
    sys.exit(main())
