"""The files and folders a command's flags name, checked right after the flags and before torch and
transformers load: a missing --data or --model is one line at once, not after seconds of start-up.

    error: --data data/pretrain.jsonll: no such file or folder; did you mean data/pretrain.jsonl?

Only what a name alone tells (it exists, a tokenizer folder holds tokenizer.json, an adapter folder
its adapter_config.json); the loaders check the contents.
"""
import difflib
from pathlib import Path

from ..data.records import expand_paths
from ..data.tokenizer import tokenizer_folder
from ..errors import UserError

GLOB_CHARACTERS = "*?["


def must_exist(flag, path):
    """A path a flag names must exist; else one line, with the closest name in its folder."""
    if path and not Path(path).exists():
        raise UserError(f"{flag} {path}: no such file or folder{closest_sibling(Path(path))}")


def closest_sibling(path):
    folder = path.parent
    if not folder.is_dir():
        return f" ({folder} does not exist either)" if str(folder) not in ("", ".") else ""
    close = difflib.get_close_matches(path.name, [item.name for item in folder.iterdir()], n=1, cutoff=0.7)
    return f"; did you mean {folder / close[0]}?" if close else ""


def data_files(flag, arguments):
    """--data / --eval_data: files, folders or glob patterns that name at least one file each."""
    for argument in arguments or []:
        if not any(char in argument for char in GLOB_CHARACTERS):
            must_exist(flag, argument)
    try:
        expand_paths(arguments or [])
    except UserError as error:  # a pattern without matches, a folder without data files
        raise UserError(f"{flag}: {error}") from None


def tokenizer(flag, path):
    if path:
        must_exist(flag, path)
        tokenizer_folder(path)


def adapter(flag, path):
    if path:
        must_exist(flag, path)
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{flag} {path}: not a LoRA adapter folder (no adapter_config.json; training with "
                            f"--lora_rank writes one in OUTPUT_DIR/adapter)")


def model_flags(args):
    """--model, --tokenizer and --adapter of the verbs that run a trained model."""
    must_exist("--model", args.model)
    tokenizer("--tokenizer", args.tokenizer)
    adapter("--adapter", args.adapter)
