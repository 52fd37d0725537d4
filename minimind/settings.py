"""Typed settings: dataclass fields that carry what a command line needs to offer them as flags.

The library's settings (training/config.py) are plain dataclasses; `setting(...)` adds to a field
its help, range, choices and aliases, which the commands layer (commands/flags.py) turns into a
checked flag. The library itself never parses flags.
"""
from dataclasses import field


def setting(default, help, *, type=None, low=None, high=None, low_open=False, high_open=False, choices=None,
            nargs=None, aliases=(), flag=None):
    """A dataclass field that is also a command-line flag (`--name`, or `flag`), checked when read."""
    metadata = {"help": help, "type": type, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "choices": choices, "nargs": nargs, "aliases": tuple(aliases), "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)
