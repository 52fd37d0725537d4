"""The command line: every numeric flag of every verb checked before work starts, in one line;
--help and flag errors answer without importing torch."""
import argparse
import subprocess
import sys

import pytest

from minimind.commands import main as cli
from minimind.commands.flags import HelpFormatter

# Zero (refused unless the flag's range holds it), and values wrong for every flag: negative, not a
# number, absurdly large.
PROBES = ["0", "-1", "nan", "1e30"]


def verb_parsers():
    """(verb, parser) for every verb; `tokenizer` contributes its `train` subparser."""
    parsers = []
    for verb in cli.VERBS:
        parser = cli.verb_module(verb).parser()
        sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parsers += [(f"{verb} {name}", p) for s in sub for name, p in s.choices.items()] or [(verb, parser)]
    return parsers


def numeric_actions(parser):
    return [a for a in parser._actions if getattr(a.type, "__name__", "") in ("int", "float") and a.option_strings]


def required_arguments(parser):
    values = []
    for action in parser._actions:
        if action.required and action.option_strings:
            values += [action.option_strings[0], str(action.choices[0]) if action.choices else "x"]
    return values


WITH_NUMBERS = [(verb, parser) for verb, parser in verb_parsers() if numeric_actions(parser)]


def test_the_numeric_flags_are_all_found():
    found = {verb: len(numeric_actions(parser)) for verb, parser in WITH_NUMBERS}
    assert found["train"] >= 25 and {"generate", "chat", "eval", "tokenizer train"} <= set(found), found


@pytest.mark.parametrize("verb, parser", WITH_NUMBERS, ids=[verb for verb, _ in WITH_NUMBERS])
def test_every_numeric_flag_refuses_bad_values_in_one_line(verb, parser):
    actions = numeric_actions(parser)
    required = required_arguments(parser)
    for action in actions:
        flag = action.option_strings[0]
        for probe in PROBES:
            zero_allowed = probe == "0" and not raises(action.type, probe)
            if zero_allowed:
                parser.parse_args(required + [flag, probe])
                continue
            with pytest.raises(Exception) as error:
                parser.parse_args(required + [flag, probe])
            message = str(error.value)
            assert type(error.value).__name__ == "UserError" and "\n" not in message, (verb, flag, probe)
            assert f"argument {flag}" in message and "must be" in message and f"got {probe}" in message, message


def raises(function, value):
    try:
        function(value)
    except argparse.ArgumentTypeError:
        return True
    return False


@pytest.mark.parametrize("verb, parser", verb_parsers(), ids=[verb for verb, _ in verb_parsers()])
def test_every_flag_has_help_with_its_default(verb, parser):
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{verb} {action.option_strings[0]} has no help text"
        shown = HelpFormatter("x")._get_help_string(action)
        if action.default is not None and action.default is not False:
            assert "default" in shown or "[" in shown, f"{verb} {action.option_strings[0]}: {shown}"
        elif not action.required:
            # None / off defaults are said in the help itself: [brackets], or a flag that is off by default
            assert "[" in shown or "default: off" in shown or action.nargs == "?", f"{verb} {action.option_strings[0]}: {shown}"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"],
                                  ["train", "--learning_rate", "0"], ["chat", "--model", "m", "--top_p", "0"],
                                  ["tokenizer", "train", "--help"]])
def test_help_and_flag_errors_do_not_import_torch(argv):
    """--help and a bad flag answer before the heavy libraries load (about 0.2 s instead of 7)."""
    code = ("import sys\nfrom minimind.commands.main import main\ntry:\n    code = main(%r)\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('torch' in sys.modules, 'transformers' in sys.modules, code)" % argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    torch_loaded, transformers_loaded, exit_code = result.stdout.split()[-3:]
    assert (torch_loaded, transformers_loaded) == ("False", "False"), result.stdout + result.stderr
    assert exit_code == ("0" if "--help" in argv else "2")
    if exit_code == "2":
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: argument --")
