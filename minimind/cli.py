"""The `minimind` command: one entry point with verbs, each a thin layer over the library.

    minimind train ...        (same as python train.py)
    minimind tokenizer train ...
    minimind generate | chat | eval | merge | export ...

Each verb lives in the module that implements it and exposes `main(argv)`; this file only
dispatches and turns a UserError into one clear line and exit code 2.
"""
import importlib
import sys

from .errors import UserError

# verb -> (module, function, one-line help)
VERBS = {
    "train": ("minimind.training", "main", "train a model (pretraining, SFT, DPO, LoRA); same as python train.py"),
    "tokenizer": ("minimind.tokenizer", "main", "train a byte-level BPE tokenizer on your text"),
    "generate": ("minimind.generation", "main_generate", "continue a prompt with a trained model"),
    "chat": ("minimind.generation", "main_chat", "chat with a trained model in the terminal"),
    "eval": ("minimind.evaluation", "main", "perplexity and exact-match accuracy on a data file"),
    "merge": ("minimind.lora", "main_merge", "merge a LoRA adapter into its base model"),
    "export": ("minimind.export", "main", "write the model for transformers (Llama layout), llama.cpp or Ollama (GGUF)"),
}


def usage():
    lines = ["usage: minimind VERB [options]   (minimind VERB --help for details)", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, (_, _, text) in VERBS.items()]
    return "\n".join(lines)


def run_user_command(function, argv):
    """Run a command; a UserError becomes one line on stderr and exit code 2."""
    try:
        return function(argv) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    import transformers
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars are noise in our output
    module_name, function_name, _ = VERBS[verb]
    function = getattr(importlib.import_module(module_name), function_name)
    return run_user_command(function, rest)


if __name__ == "__main__":
    sys.exit(main())
