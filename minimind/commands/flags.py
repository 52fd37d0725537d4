"""Command-line flags shared by every verb: one parser class, value checks, booleans, config files.

Every flag is checked when it is read, before any work starts: a bad value is one line naming the
flag and what it accepts, exit code 2, never a traceback from deep inside the run.

    error: argument --learning_rate: must be a number in (0, 1], got 0

A flag declared with `settings.setting(...)` in a library dataclass (training/config.py) becomes an
argparse argument through `add_settings`; the dataclass is the one place that holds its type, default,
range and help.
"""
import argparse
import difflib
import json
import math
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import UserError

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is one --help away) and defaults in the help.
    A bad flag raises UserError, which the command line prints as one line with exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """argparse's parse_args, with a suggestion for each unknown flag."""
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{suggestions(unknown, all_options(self))}")
        return namespace


def all_options(parser):
    """The --names a parser and its sub-commands' parsers accept."""
    names = set()
    for action in parser._actions:
        names.update(name for name in action.option_strings if name.startswith("--"))
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            names |= all_options(sub)
    return names


# Names other tools give to our settings (Hugging Face's configs and Trainer, nanoGPT): such a name
# gets ours in its error, rather than becoming a second name for the same flag (one vocabulary: the
# same word in --help, run_config.yaml and every message). NOTES replaces "our name for X" where the
# two differ in more than the name; None: no flag of ours.
NAMES_ELSEWHERE = {
    "num_attention_heads": "num_heads", "n_head": "num_heads", "num_hidden_layers": "num_layers",
    "n_layer": "num_layers", "n_embd": "hidden_size", "d_model": "hidden_size",
    "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "batch_size",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "accumulation_steps",
    "num_train_epochs": "epochs", "max_length": "max_seq_len", "max_seq_length": "max_seq_len",
    "model_max_length": "max_seq_len", "block_size": "max_seq_len", "seq_len": "max_seq_len", "lr": "learning_rate",
    "max_grad_norm": "grad_clip", "logging_steps": "log_interval", "eval_steps": "eval_interval",
    "resume_from_checkpoint": "resume", "model_name_or_path": "model", "tokenizer_name": "tokenizer",
    "train_file": "data", "dataset": "data", "validation_file": "eval_data", "lora_r": "lora_rank",
    "torch_dtype": "dtype", "bf16": "dtype", "fp16": "dtype", "warmup_ratio": "warmup_steps",
    "do_sample": "temperature", "intermediate_size": None,
}
NOTES = {"bf16": "--dtype bfloat16", "fp16": "--dtype float16",
         "warmup_ratio": "warmup counted in optimizer steps; 2% of the run by default",
         "do_sample": "0 = greedy, above 0 samples",
         "intermediate_size": "the feed-forward width is not a flag: it follows --hidden_size"}


def suggestions(words, options, prefix="--"):
    """'; did you mean --learning_rate?' for the unknown flags among `words` (config-file keys with
    prefix=''); empty when nothing is close."""
    names = [word.split("=", 1)[0][len(prefix):] for word in words if word.startswith(prefix)]
    hints = [(name, name_elsewhere(name, options, prefix) or close_name(name, options, prefix)) for name in names]
    hints = [f"{prefix}{name}: {hint}" if len(names) > 1 else hint for name, hint in hints if hint]
    return "; " + "; ".join(hints) if hints else ""


def name_elsewhere(name, options, prefix):
    """The hint for a name other tools use (NAMES_ELSEWHERE), if this verb has the flag it maps to."""
    if name not in NAMES_ELSEWHERE:
        return None
    ours, note = NAMES_ELSEWHERE[name], NOTES.get(name)
    if ours is None:
        return note
    if "--" + ours not in options:
        return None
    return f"did you mean {prefix}{ours} ({note or f'our name for {name}'})?"


def close_name(name, options, prefix):
    names = sorted(option[2:] for option in options)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    return f"did you mean {prefix}{close[0]}?" if close else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a default that depends on other flags is said in [brackets] by its help."""

    def _get_help_string(self, action):
        if action.default is None or action.default == argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        if isinstance(action.default, bool) and action.nargs == "?":
            return f"{action.help} (default: {'on' if action.default else 'off'})"
        return super()._get_help_string(action)


# ---------------------------------------------------------------- value checks (argparse types)

def number_text(value):
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def describe_range(kind, low, high, low_open, high_open):
    if low is None and high is None:
        return f"must be {'an integer' if kind is int else 'a number'}"
    if high is None:
        return f"must be {'an integer' if kind is int else 'a number'} {'>' if low_open else '>='} {number_text(low)}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return (f"must be {'an integer' if kind is int else 'a number'} in "
            f"{left}{number_text(low)}, {number_text(high)}{right}")


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: int or float within [low, high] (bounds None = unbounded; open ends with
    low_open/high_open); NaN and infinities are refused."""
    what = describe_range(kind, low, high, low_open, high_open)

    def check(text):
        try:
            value = kind(text)  # int("1.5") and float("abc") raise; values from a config file arrive typed
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{what}, got {text}") from None
        # a bool from a config file, 2.5 for an integer, NaN or infinity
        if isinstance(text, bool) or value != text and not isinstance(text, str) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return value

    check.__name__ = kind.__name__  # argparse names the type in some messages
    return check


def boolean(text):
    """1/0, true/false, yes/no, on/off (any case), or a bool from a config file."""
    if isinstance(text, bool):
        return text
    if isinstance(text, int) and text in (0, 1):
        return bool(text)
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"must be one of 1/0, true/false, yes/no, on/off, got {text!r}")


def add_boolean(parser, *names, default=False, help=""):
    """A boolean flag that behaves the same in every verb: `--flag` alone means on, `--flag 0` off,
    `--flag 1` on (the seed's `--use_moe 1` spelling keeps working)."""
    return parser.add_argument(*names, nargs="?", const=True, default=default, type=boolean, metavar="0|1", help=help)


# ---------------------------------------------------------------- dataclass settings <-> flags

def argument_type(kind, meta):
    if kind is bool:
        return boolean
    if kind in (int, float):
        return bounded(kind, meta["low"], meta["high"], meta["low_open"], meta["high_open"])
    return kind


def add_settings(group, cls, only=None, helps=None):
    """Add a flag for every field of dataclass `cls` (or the fields named in `only`) to an argparse
    group; `helps` replaces the help of some of them where a verb uses them differently."""
    for item in fields(cls):
        meta = item.metadata
        if "help" not in meta or only is not None and item.name not in only:
            continue
        names = ["--" + (meta["flag"] or item.name)] + ["--" + alias for alias in meta["aliases"]]
        default = item.default if item.default is not MISSING else item.default_factory()
        kind = meta["type"] or (type(default) if default is not None else str)
        if kind is bool:
            add_boolean(group, *names, default=default, help=(helps or {}).get(item.name, meta["help"]))
            continue
        group.add_argument(*names, dest=item.name, default=default, type=argument_type(kind, meta),
                           choices=meta["choices"], nargs=meta["nargs"],
                           help=(helps or {}).get(item.name, meta["help"]))


def from_namespace(cls, namespace):
    """The dataclass `cls` filled from parsed flags."""
    return cls(**{item.name: getattr(namespace, item.name) for item in fields(cls) if item.name in vars(namespace)})


# ---------------------------------------------------------------- config files

def read_config_file(path, parser):
    """Flag values from a YAML or JSON mapping, each checked as if it had been typed."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot parse ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        hints = suggestions(unknown, {"--" + name for name in actions}, prefix="")
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}{hints}; see {parser.prog} --help")
    return {name: check_file_value(path, actions[name], value) for name, value in values.items()}


def check_file_value(path, action, value):
    if value is None or action.type is None:
        return value
    try:
        if isinstance(value, list):
            checked = [action.type(v) for v in value]
        else:
            checked = action.type(value)
    except argparse.ArgumentTypeError as error:
        raise UserError(f"{path}: {action.dest}: {error}") from None
    if action.choices is not None and checked not in action.choices:
        raise UserError(f"{path}: {action.dest}: must be one of {', '.join(map(str, action.choices))}, got {value}")
    return checked
