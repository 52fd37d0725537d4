"""The command line: every numeric flag of every verb checked before work starts, in one line;
--help and flag errors answer without importing torch."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minimind.commands import main as cli
from minimind.commands.flags import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- typos and names from elsewhere

@pytest.mark.parametrize("argv, message", [
    (["train", "--learnig_rate", "3e-4"],
     "unrecognized arguments: --learnig_rate 3e-4; did you mean --learning_rate? (see minimind train --help)"),
    (["train", "--num_attention_heads", "8"],
     "unrecognized arguments: --num_attention_heads 8; did you mean --num_heads (our name for num_attention_heads)? "
     "(see minimind train --help)"),
    (["train", "--per_device_train_batch_size", "8", "--num_train_epochs=2"],
     "unrecognized arguments: --per_device_train_batch_size 8 --num_train_epochs=2; --per_device_train_batch_size: "
     "did you mean --batch_size (our name for per_device_train_batch_size)?; --num_train_epochs: did you mean --epochs "
     "(our name for num_train_epochs)? (see minimind train --help)"),
    (["train", "--intermediate_size", "128"], "unrecognized arguments: --intermediate_size 128; the feed-forward width "
                                              "is not a flag: it follows --hidden_size (see minimind train --help)"),
    (["train", "--xyzzy", "1"], "unrecognized arguments: --xyzzy 1 (see minimind train --help)"),
    (["chat", "--model", "m", "--temprature", "0.5"],
     "unrecognized arguments: --temprature 0.5; did you mean --temperature? (see minimind chat --help)"),
    (["generate", "--model", "m", "--prompt", "x", "--max_length", "9"],  # generate has no --max_seq_len
     "unrecognized arguments: --max_length 9 (see minimind generate --help)"),
    (["tokenizer", "train", "--data", "a", "--output_dir", "b", "--vocab_sise", "100"],
     "unrecognized arguments: --vocab_sise 100; did you mean --vocab_size? (see minimind tokenizer --help)"),
])
def test_an_unknown_flag_gets_the_closest_one_or_ours_for_a_hugging_face_name(argv, message, capsys):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_config_file_with_hugging_face_names_gets_ours(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num_hidden_layers: 4\nlearnig_rate: 0.001\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: {config}: unknown setting(s) learnig_rate, num_hidden_layers; "
                                       f"learnig_rate: did you mean learning_rate?; num_hidden_layers: did you mean "
                                       f"num_layers (our name for num_hidden_layers)?; see minimind train --help\n")


# ---------------------------------------------------------------- missing files, an earlier run: before torch

def test_missing_files_and_an_earlier_run_are_reported_before_torch_loads(tmp_path):
    """Each verb checks the files its flags name right after the flags, in a process where importing
    torch or transformers would fail: the answer comes without them, in one line, exit code 2."""
    poison = tmp_path / "poison"
    for name in ("torch", "transformers"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    run, model, missing = tmp_path / "run", tmp_path / "model", str(tmp_path / "missing")
    (run / "final").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"an earlier run")
    model.mkdir()
    out = ["--output_dir", str(tmp_path / "out")]
    cases = {
        "train --data data/pretrain.jsonll": "--data data/pretrain.jsonll: no such file or folder; did you mean "
                                             "data/pretrain.jsonl?",
        "train --data data/*.parquet": "--data: no files match 'data/*.parquet'",
        f"train --eval_data {missing}": f"--eval_data {missing}: no such file or folder",
        f"train --pretrained_path {missing}": f"--pretrained_path {missing}: no such file or folder",
        f"train --tokenizer {model}": f"no tokenizer at {model}: expected a folder with tokenizer.json",
        f"train --stage distill --teacher {missing}": f"--teacher {missing}: no such file or folder",
        f"train --config {missing}.yaml": f"{missing}.yaml: config file not found",
        f"train --stage grpo --reward exact_match {missing}.py:brevity=0.5": f"--reward {missing}.py: no such file",
        f"train --output_dir {run}": f"{run} holds an earlier run (checkpoint.pt, final/): add --resume to continue "
                                     f"it, --overwrite to delete it and start over, or choose another --output_dir",
        f"generate --model {missing} --prompt x": f"--model {missing}: no such file or folder",
        f"chat --model {model} --adapter {model}": f"--adapter {model}: not a LoRA adapter folder",
        f"eval --model {model} --data {missing}": f"--data {missing}: no such file or folder",
        f"serve --model {model} --tokenizer {missing}": f"--tokenizer {missing}: no such file or folder",
        f"merge --model {model} --adapter {missing} " + " ".join(out): f"--adapter {missing}: no such file or folder",
        f"export --model {missing} --to llama " + " ".join(out): f"--model {missing}: no such file or folder",
        f"tokenizer train --data {missing} " + " ".join(out): f"--data {missing}: no such file or folder",
    }
    code = ("import json, sys\nfrom minimind.commands.main import main\nresults = []\n"
            "for argv in json.loads(sys.argv[1]):\n    results.append(main(argv))\n"
            "print(json.dumps([results, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps([case.split() for case in cases])], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(poison), str(ROOT)])})
    codes, torch_loaded, transformers_loaded = json.loads(result.stdout.splitlines()[-1])
    errors = result.stderr.splitlines()
    assert (torch_loaded, transformers_loaded) == (False, False) and codes == [2] * len(cases), result.stderr
    assert len(errors) == len(cases), result.stderr
    for (case, message), error in zip(cases.items(), errors):
        assert error.startswith(f"error: {message}"), (case, error)


def test_output_into_a_closed_pipe_ends_without_a_traceback():
    """`minimind --help | head -1`: the reader leaves before the usage is written."""
    process = subprocess.Popen([sys.executable, "-c", "from minimind.commands.main import cli; cli()", "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the child, still importing, writes a byte
    err = process.stderr.read()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("verb, spin", [("train", cli.TRAINING_SPIN), ("export", cli.TRAINING_SPIN),
                                        ("generate", cli.DECODING_SPIN), ("serve", cli.DECODING_SPIN)])
def test_waiting_threads_spin_briefly_unless_the_user_chose(monkeypatch, verb, spin):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cli.set_openmp_waiting(verb)
    assert os.environ["GOMP_SPINCOUNT"] == spin and "OMP_WAIT_POLICY" not in os.environ
    assert int(cli.TRAINING_SPIN) < int(cli.DECODING_SPIN)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # exported: it wins, nothing is added
    cli.set_openmp_waiting(verb)
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
