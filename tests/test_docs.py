"""The documentation cannot drift from the code.

Read from README.md, README.zh-CN.md and docs/**/*.md (tests/doc_reader.py does the reading):
- every command of a fenced shell block: `minimind VERB [SUBVERB]` and `train.py` (also under torchrun)
  use only flags their parser declares, aliases included, and parse as written; `python SCRIPT.py`
  names a script of the repository and uses only its flags. Inline code that is such a command
  (`train.py --lora_rank 8` in a table) has its flags checked too;
- every relative link reaches a file of the repository, and its #anchor a heading of that file
  (GitHub's slugs, Chinese headings included);
- a translation shows the same code: each command or code block of README.zh-CN.md and docs/zh/X.md
  appears, character for character, in README.md / docs/X.md.
Then short commands taken from the docs run for real in a scratch directory, tiny shapes appended,
and the self-contained Python examples of docs/architecture.md run and print what their comments say.

A failure names file:line, the command, link or block, and what to change.
"""
import argparse
import contextlib
import difflib
import io
import os
import re
import runpy
import shlex
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from unittest import mock
from urllib.parse import unquote

import pytest

from minimind.commands import main as cli
from minimind.errors import UserError
from tests.doc_reader import (REPO, SHELL_LANGUAGES, Slugger, anchors, code_spans, heading_text, is_shell, links,
                              markdown_files, read_markdown, shell_commands, shown, slug)

PYTHON = re.compile(r"(^|/)python(\d+(\.\d+)?)?$")
HELP = ("-h", "--help")
COMPARED_LANGUAGES = SHELL_LANGUAGES | {"python", "json", "yaml", "toml"}


# ---------------------------------------------------------------- which program a command runs

def invocation(argv):
    """(program, its arguments) for the commands checked here: ("minimind", [...]) or (a script such
    as "train.py" or "bench/generate_speed.py", [...]); None for every other program."""
    head = argv[0]
    if head == "minimind":
        return "minimind", argv[1:]
    if PYTHON.search(head):
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            if rest[0] == "-m":
                return ("minimind", rest[2:]) if rest[1:2] in (["minimind"], ["minimind.cli"]) else None
            if rest[0] == "-c":
                return None
            rest = rest[1:]
        return (os.path.normpath(rest[0]), rest[1:]) if rest else None
    if head == "torchrun" or head.endswith(".py"):  # torchrun [its options] SCRIPT.py [the script's flags]
        scripts = [index for index, word in enumerate(argv) if word.endswith(".py")]
        return (os.path.normpath(argv[scripts[0]]), argv[scripts[0] + 1:]) if scripts else None
    return None


def option_strings(parser):
    return {name for action in parser._actions for name in action.option_strings}


def subcommands(parser):
    return next((action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)),
                None)


def minimind_parser(args):
    """(title, parser, verb, arguments after the verb words) for `minimind ARGS`, or a problem string;
    None when there is nothing to check (`minimind` or `minimind --help`)."""
    if not args or args[0] in HELP:
        return None
    verb = args[0]
    if verb not in cli.VERBS:
        return f"`minimind {verb}` is not a verb (the verbs: {', '.join(cli.VERBS)})"
    parser, title, rest = cli.verb_module(verb).parser(), f"minimind {verb}", args[1:]
    choices = subcommands(parser)
    if choices is not None:
        if rest and rest[0] in choices:
            parser, title, rest = choices[rest[0]], f"{title} {rest[0]}", rest[1:]
        elif not (rest and rest[0] in HELP):
            return f"`{title}` needs one of: {', '.join(choices)}"
    return title, parser, verb, rest


class CapturedParser(Exception):
    pass


@lru_cache(maxsize=None)
def script_options(path):
    """The flags of a script with an argparse parser, read by running it until it parses its flags
    (nothing after that runs); None for a script without one."""
    if "ArgumentParser(" not in Path(path).read_text(encoding="utf-8"):
        return None
    captured = []

    def capture(parser, *args, **kwargs):
        captured.append(parser)
        raise CapturedParser

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
            mock.patch.object(sys, "argv", [str(path)]), mock.patch.object(sys, "path", list(sys.path)):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except CapturedParser:
            pass
    return frozenset(option_strings(captured[0])) if captured else None


# ---------------------------------------------------------------- checking one command

def unknown_flags(title, options, args):
    """One problem per word that looks like a flag and is not one of `options`."""
    problems = []
    for word in args:
        if re.match(r"^--?[A-Za-z]", word):
            name = word.split("=", 1)[0]
            if name not in options:
                close = difflib.get_close_matches(name, sorted(options), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; see {title} --help"
                problems.append(f"{name} is not a flag of `{title}`{hint}")
    return problems


def refusal(verb, args, files):
    """What the verb's own flag parsing says about `args` (None if it accepts them). A --config file is
    read when the same block writes it (a here-document) or the repository holds it; a file the reader
    makes (output/run_config.yaml) is left out."""
    if any(word in HELP for word in args):
        return None
    args = list(args)
    with tempfile.TemporaryDirectory() as scratch:
        if "--config" in args[:-1]:
            at = args.index("--config") + 1
            if args[at] in files:
                written = Path(scratch) / Path(args[at]).name
                written.write_text(files[args[at]])
                args[at] = str(written)
            elif (REPO / args[at]).is_file():
                args[at] = str(REPO / args[at])
            else:
                del args[at - 1:at + 1]
        try:
            cli.parse(verb, args)
        except UserError as error:
            return f"`{'train.py' if verb == 'train' else 'minimind ' + verb}` refuses it: {error}"
    return None


def verb_problems(title, parser, verb, flags, arguments, files, whole):
    """Flags the parser does not declare; for a whole command, also what its parsing refuses."""
    problems = unknown_flags(title, option_strings(parser), flags)
    if problems or not whole:
        return problems
    refused = refusal(verb, arguments, files)
    return [refused] if refused else []


def minimind_problems(args, files, whole):
    target = minimind_parser(args)
    if target is None:
        return []
    if isinstance(target, str):  # no such verb, or a verb without its sub-verb
        # inline prose may name verbs loosely ("minimind generate/chat/eval"): only a plain word must be a verb
        return [target] if whole or re.fullmatch(r"[a-z_]+", args[0]) else []
    title, parser, verb, rest = target
    return verb_problems(title, parser, verb, rest, args[1:], files, whole)


def script_problems(script, args):
    """A `python SCRIPT.py` must name a script of the repository and use only the flags it declares."""
    if not (REPO / script).is_file():
        return [f"there is no script {script} in the repository"]
    args, passed_on = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    options = script_options(str(REPO / script)) if any(word.startswith("-") for word in args) else None
    problems = [] if options is None else unknown_flags(f"python {script}", options | set(HELP), args)
    # what follows `--` goes to train.py (bench/forecast_accuracy.py custom -- FLAGS)
    return problems + unknown_flags("train.py", option_strings(cli.verb_module("train").parser()), passed_on)


def command_problems(argv, files=None, whole=True):
    """What is wrong with one command (its words); `whole` for a command of a shell block, which must
    also parse as written (inline code may hold placeholders such as `--model M`)."""
    found = invocation(argv)
    if found is None:
        return []
    program, args = found
    if program == "minimind":
        return minimind_problems(args, files or {}, whole)
    if program == "train.py":
        return verb_problems("train.py", cli.verb_module("train").parser(), "train", args, args, files or {}, whole)
    return script_problems(program, args)


def block_problems(block):
    """Problems of every command in a shell block; files its here-documents write feed later --config."""
    problems, files = [], {}
    for command in shell_commands(block):
        if command.argv[0] == "<unbalanced quotes>":
            problems.append(f"{command.where}: unbalanced quotes in `{command.argv[1].strip()}`")
            continue
        problems += [f"{command.where}: `{command.text}`: {problem}"
                     for problem in command_problems(command.argv, files)]
        files.update(command.writes)
    return problems


def inline_command(text):
    """The words of inline code that is a command checked here (`minimind ...`, `python x.py`,
    `train.py --flag ...`), else None: a file name alone (`kernels.py`) is no command."""
    try:
        argv = shlex.split(text)
    except ValueError:
        return None
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        argv.pop(0)
    if not argv:
        return None
    script_with_flags = argv[0].endswith(".py") and len(argv) > 1 and argv[1].startswith("-")
    return argv if argv[0] in ("minimind", "torchrun") or PYTHON.search(argv[0]) or script_with_flags else None


def document_command_problems(path):
    markdown = read_markdown(path)
    problems = [problem for block in markdown.blocks if is_shell(block) for problem in block_problems(block)]
    for line, text in code_spans(markdown):
        argv = inline_command(text)
        if argv:
            problems += [f"{shown(path)}:{line}: `{text}`: {problem}"
                         for problem in command_problems(argv, whole=False)]
    return problems


# ---------------------------------------------------------------- links

@lru_cache(maxsize=None)
def anchors_of(path):
    return frozenset(anchors(read_markdown(path)))


def link_problems(path, root=REPO):
    """A relative link must reach a file under `root`; its #anchor, a heading of that file."""
    markdown, problems = read_markdown(path), []
    for line, target in links(markdown):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # a URL
        where = f"{shown(path, root)}:{line}: link ({target})"
        file_part, _, anchor = target.partition("#")
        destination = (Path(path).parent / unquote(file_part)).resolve() if file_part else Path(path).resolve()
        if not destination.is_relative_to(root):
            problems.append(f"{where} leads out of the repository to {destination}")
        elif not destination.exists():
            problems.append(f"{where}: there is no {shown(destination, root)}")
        elif anchor and destination.suffix == ".md" and unquote(anchor) not in anchors_of(destination):
            known = sorted(anchors_of(destination))
            close = difflib.get_close_matches(unquote(anchor), known, n=1)
            hint = f"; did you mean #{close[0]}?" if close else f"; its anchors: {', '.join(known)}"
            problems.append(f"{where}: {shown(destination, root)} has no heading #{unquote(anchor)}{hint}")
    return problems


# ---------------------------------------------------------------- translations

def translations(root=REPO):
    """(translation, English original) pairs: README.zh-CN.md -> README.md, docs/zh/X.md -> docs/X.md."""
    pairs = [(root / "README.zh-CN.md", root / "README.md")] if (root / "README.zh-CN.md").exists() else []
    return pairs + [(path, root / "docs" / path.name) for path in sorted((root / "docs" / "zh").glob("*.md"))]


def translation_problems(translated, original):
    """Each command or code block of a translation must appear verbatim in the original."""
    if not original.exists():
        return [f"{shown(translated)}: translates {shown(original)}, which does not exist"]
    english = {block.text for block in read_markdown(original).blocks}
    return [f"{shown(translated)}:{block.line}: this {block.language or 'shell'} block is not in {shown(original)}; "
            f"code stays as in the English document (copy its current block)"
            for block in read_markdown(translated).blocks
            if (block.language in COMPARED_LANGUAGES or is_shell(block)) and block.text not in english]


# ---------------------------------------------------------------- the checks over the repository's docs

DOCS = markdown_files()
DOC_IDS = [shown(path) for path in DOCS]


def report(problems):
    return "\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_commands_in_the_docs_use_existing_verbs_and_flags(path):
    problems = document_command_problems(path)
    assert not problems, report(problems)


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_relative_links_in_the_docs_resolve(path):
    problems = link_problems(path)
    assert not problems, report(problems)


@pytest.mark.parametrize("translated, original", translations(), ids=[shown(t) for t, _ in translations()])
def test_translations_show_the_same_code_as_the_english(translated, original):
    problems = translation_problems(translated, original)
    assert not problems, report(problems)


def test_both_readmes_link_to_each_other():
    english, chinese = (read_markdown(REPO / name) for name in ("README.md", "README.zh-CN.md"))
    assert "README.zh-CN.md" in [target for line, target in links(english) if line <= 5]
    assert "README.md" in [target for line, target in links(chinese) if line <= 5]


# ---------------------------------------------------------------- the checker itself finds drift

BROKEN_DOC = """# Guide

## Same name
## Same name
## 第 1 步：安装

See [the flags](#same-name-1), [missing](#no-such-heading), [a file](nowhere.md), [outside](../../x.md),
[中文](#第-1-步安装) and [code](`#not-a-link`).

```bash
OMP_NUM_THREADS=1 python train.py --hidden_sise 64 \\
    --epochs 2   # a comment with an apostrophe's
minimind tokenizer train --data a.txt --output_dir tok && minimind frobnicate --x 1
minimind export --model m --to onnx --output_dir out
minimind tokenizer --data a.txt
python bench/no_such_bench.py --fast
cat > run.yaml <<'EOF'
epochs: 1
no_such_setting: 3
EOF
python train.py --config run.yaml
```

Inline: `train.py --lora_rnk 8`, `minimind generate/chat/eval`, `minimind merge --model M --adapter A --output_dir D`.
"""


@pytest.fixture
def broken_doc(tmp_path):
    path = tmp_path / "docs" / "guide.md"
    path.parent.mkdir()
    path.write_text(BROKEN_DOC, encoding="utf-8")
    return path


def test_drift_is_reported_with_file_line_and_what_to_change(broken_doc):
    problems = document_command_problems(broken_doc)
    text = "\n".join(problems)
    assert f"{broken_doc}:11: `OMP_NUM_THREADS=1" not in text  # the env prefix is not part of the command
    assert f"{broken_doc}:11: `python train.py --hidden_sise 64 --epochs 2`: --hidden_sise is not a flag of " \
           f"`train.py`; did you mean --hidden_size?" in problems
    assert any(p.startswith(f"{broken_doc}:13: `minimind frobnicate --x 1`: `minimind frobnicate` is not a verb")
               for p in problems)
    assert any(p.startswith(f"{broken_doc}:14: `minimind export") and "refuses it" in p and "onnx" in p
               for p in problems)
    assert f"{broken_doc}:15: `minimind tokenizer --data a.txt`: `minimind tokenizer` needs one of: train" in problems
    assert f"{broken_doc}:16: `python bench/no_such_bench.py --fast`: there is no script bench/no_such_bench.py " \
           f"in the repository" in problems
    assert any(p.startswith(f"{broken_doc}:21: `python train.py --config run.yaml`") and "no_such_setting" in p
               for p in problems)
    assert any(p.startswith(f"{broken_doc}:24: `train.py --lora_rnk 8`: --lora_rnk is not a flag") for p in problems)
    assert len(problems) == 7, report(problems)  # the tokenizer train line and the merge span are right


def test_a_quoted_string_over_several_lines_is_one_word(tmp_path):
    doc = tmp_path / "serving.md"
    doc.write_text("""```bash
curl http://127.0.0.1:8000/v1/chat/completions -d '{
  "messages": [{"role": "user", "content": "Hi"}]
}'
minimind chat --modle m
```
""")
    block = read_markdown(doc).blocks[0]
    assert [command.argv[0] for command in shell_commands(block)] == ["curl", "minimind"]
    assert block_problems(block) == [f"{doc}:5: `minimind chat --modle m`: --modle is not a flag of `minimind chat`; "
                                     f"did you mean --model?"]


def test_broken_links_are_reported_with_the_anchors_there_are(broken_doc):
    problems = link_problems(broken_doc, root=broken_doc.parent.parent)
    assert problems == [
        "docs/guide.md:7: link (#no-such-heading): docs/guide.md has no heading #no-such-heading; its anchors: "
        "guide, same-name, same-name-1, 第-1-步安装",
        f"docs/guide.md:7: link (../../x.md) leads out of the repository to {broken_doc.parent.parent.parent / 'x.md'}",
        "docs/guide.md:7: link (nowhere.md): there is no docs/nowhere.md",
    ]


def test_a_translated_block_that_differs_from_the_english_is_reported(tmp_path):
    (tmp_path / "docs" / "zh").mkdir(parents=True)
    (tmp_path / "docs" / "guide.md").write_text("```bash\npython train.py --epochs 2\n```\n\n```\nlayout\n```\n")
    translated = tmp_path / "docs" / "zh" / "guide.md"
    translated.write_text("```bash\npython train.py --epochs 3\n```\n\n```\n目录\n```\n", encoding="utf-8")
    assert translations(tmp_path) == [(translated, tmp_path / "docs" / "guide.md")]
    problems = translation_problems(translated, tmp_path / "docs" / "guide.md")
    assert len(problems) == 1 and problems[0].endswith(":1: this bash block is not in "
                                                       f"{tmp_path / 'docs' / 'guide.md'}; code stays as in the "
                                                       f"English document (copy its current block)")


@pytest.mark.parametrize("heading, anchor", [
    ("13. The two families: MiniMind2 and MiniMind-3", "13-the-two-families-minimind2-and-minimind-3"),
    ("MiniMind-3's YaRN (`model_family=\"minimind3\"`)", "minimind-3s-yarn-model_familyminimind3"),
    ("Fine-tuning memory: full training against LoRA", "fine-tuning-memory-full-training-against-lora"),
    ("heading with a - dash", "heading-with-a---dash"),  # github-slugger's own examples from here
    ("heading with an _ underscore", "heading-with-an-_-underscore"),
    ("exchange.bind_headers(exchange, routing [, bindCallback])", "exchangebind_headersexchange-routing--bindcallback"),
    ("I ♥ unicode", "i--unicode"),
    ("Привет non-latin 你好", "привет-non-latin-你好"),
    ("第 1 步：软硬件环境需求及前置检查", "第-1-步软硬件环境需求及前置检查"),
    ("3. 旋转位置编码（RoPE）", "3-旋转位置编码rope"),
])
def test_slugs_are_githubs(heading, anchor):
    assert slug(heading_text(heading)) == anchor


def test_repeated_headings_get_numbered_slugs_as_on_github():
    make = Slugger()
    assert [make(text) for text in ["echo", "echo", "echo 1", "echo-1", "echo", "foxtrot-1", "foxtrot", "foxtrot"]] \
        == ["echo", "echo-1", "echo-1-1", "echo-1-2", "echo-2", "foxtrot-1", "foxtrot", "foxtrot-2"]


# ---------------------------------------------------------------- short commands from the docs, run

def test_every_verb_answers_help(capsys):
    for argv, prog in [([verb, "--help"], None) for verb in cli.VERBS] + [(["tokenizer", "train", "--help"], None),
                                                                        (["train", "--help"], "train.py")]:
        with pytest.raises(SystemExit) as exit_code:
            cli.main(argv, prog=prog)
        assert exit_code.value.code == 0
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: {prog or 'minimind ' + ' '.join(argv[:-1])}"), usage[:200]


@dataclass
class DocStep:
    """A command as one doc shows it, the flags appended so that it runs in seconds, the files it must write."""
    doc: str
    command: str
    extra: str = ""
    writes: tuple = ()


QUICK = "--max_seq_len 64 --max_steps 2 --eval_max_tokens 512 --sample_tokens 8"
TINY = "--hidden_size 64 --num_layers 2 --num_heads 4 --num_key_value_heads 2 " + QUICK
SHORT = QUICK  # fine-tuning and a config file: the shape comes from the checkpoint or the file
TRAINED = ("model_final.pth", "config.json", "final/config.json", "final/model.safetensors", "checkpoint.pt",
           "metrics.jsonl", "loss.png", "run_config.yaml")

DOC_RUNS = {
    "readme session, LoRA, DPO, export": [
        DocStep("README.md", "python train.py", TINY, tuple(f"output/{name}" for name in TRAINED)),
        DocStep("README.md", "python train.py --config recipes/cpu/pretrain.yaml --output_dir output/base", SHORT,
                ("output/base/final/model.safetensors",)),
        DocStep("README.md", "python train.py --config recipes/cpu/sft.yaml --data data/sft_train.jsonl "
                             "--replay_data data/pretrain.jsonl --eval_data data/sft_eval.jsonl "
                             "--pretrained_path output/base/final --output_dir output/sft", SHORT,
                ("output/sft/final/model.safetensors",)),
        DocStep("README.md", "minimind eval --model output/sft/final --data data/sft_eval.jsonl", "--max_samples 4",
                ("output/sft/final/eval_report.json",)),
        DocStep("README.md", "minimind chat --model output/sft/final", "--max_new_tokens 8"),
        DocStep("docs/training_guide.md", "python train.py --data data/sft_train.jsonl --eval_data data/sft_eval.jsonl "
                "--pretrained_path output/final --lora_rank 8 --learning_rate 1e-3 --output_dir output/lora", SHORT,
                ("output/lora/adapter/adapter_config.json", "output/lora/adapter/adapter_model.safetensors")),
        DocStep("docs/training_guide.md",
                "minimind merge --model output/final --adapter output/lora/adapter --output_dir output/merged", "",
                ("output/merged/config.json",)),
        DocStep("docs/training_guide.md", "python train.py --stage dpo --data data/dpo_train.jsonl --eval_data "
                "data/dpo_eval.jsonl --pretrained_path output/sft/final --learning_rate 2e-5 --output_dir output/dpo",
                SHORT, ("output/dpo/final/model.safetensors",)),
        DocStep("docs/export.md", "minimind export --model output/final --to gguf --output_dir export/gguf", "",
                ("export/gguf/Modelfile",)),
    ],
    "a tokenizer and a model from your own text": [
        DocStep("docs/training_guide.md",
                "minimind tokenizer train --data my_corpus.txt --vocab_size 6400 --output_dir my_tokenizer", "",
                ("my_tokenizer/tokenizer.json",)),
        DocStep("docs/training_guide.md", "python train.py --data my_corpus.txt --tokenizer my_tokenizer --epochs 2 "
                                          "--output_dir output/mine", TINY, ("output/mine/final/tokenizer.json",)),
        DocStep("docs/training_guide.md", 'minimind generate --model output/mine/final --prompt "Once upon a time"',
                "--max_new_tokens 16"),
    ],
    "a config file": [
        DocStep("docs/training_guide.md", "cat", "", ("run.yaml",)),
        DocStep("docs/training_guide.md", "python train.py --config run.yaml --output_dir output/small", SHORT,
                ("output/small/run_config.yaml",)),
    ],
}


def doc_command(step):
    """The command of `step` as the doc shows it now (the first with these words)."""
    wanted = shlex.split(step.command)
    for block in read_markdown(REPO / step.doc).blocks:
        if is_shell(block):
            for command in shell_commands(block):
                if command.argv == wanted:
                    return command
    pytest.fail(f"{step.doc} no longer shows `{step.command}`; update DOC_RUNS in tests/test_docs.py to the "
                f"command the doc shows now")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory like the repository root: data/ and recipes/ are the bundled ones, my_corpus.txt a small text."""
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    texts = [line.split('"text": "', 1)[1].rsplit('"', 1)[0] for line in
             (REPO / "data" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:300]]
    (tmp_path / "my_corpus.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "token_cache"))
    # main() sets GOMP_SPINCOUNT unless a wait policy is exported: one is, so os.environ stays as it was
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\n"))  # for `minimind chat`
    return tmp_path


def run_step(step, capsys):
    command = doc_command(step)
    argv = command.argv + shlex.split(step.extra)
    if argv[0] == "cat":
        for name, text in command.writes.items():
            Path(name).write_text(text)
    else:
        program, args = invocation(argv)
        assert program in ("minimind", "train.py"), f"{command.where}: the doc runner runs minimind and train.py only"
        if program == "minimind":
            code = cli.main(args)
        else:
            code = cli.main(["train", *args], prog="train.py")
        output = capsys.readouterr()
        assert code == 0, (f"{command.where}: `{shlex.join(argv)}` exited with {code}:\n"
                           f"{(output.out + output.err)[-3000:]}")
    for name in step.writes:
        assert Path(name).exists(), f"{command.where}: `{shlex.join(argv)}` did not write {name}"


@pytest.mark.parametrize("scenario", list(DOC_RUNS))
def test_short_commands_from_the_docs_run(scenario, scratch, capsys):
    for step in DOC_RUNS[scenario]:
        run_step(step, capsys)


# ---------------------------------------------------------------- Python examples print what the docs say

EXAMPLE_DOCS = ["docs/architecture.md"]  # its examples stand alone and run from the repository root


def expected_output(block):
    """What a Python block says it prints, in order: the comment of a `print(...)  # X` line, and the
    column-0 `# X` lines right after a print. A `: note` after the value and `...` ellipses are not
    part of the output: each value becomes the pieces between its ellipses."""
    values, after_print, open_brackets = [], False, 0
    for line in block.lines:
        code, _, comment = line.partition("  # ")
        if line.startswith("# ") and after_print:
            values.append(line[2:])
        elif "print(" in code or open_brackets > 0:  # a print, or a line of one that spans lines
            after_print = True
            open_brackets += code.count("(") + code.count("[") - code.count(")") - code.count("]")
            if comment:
                values.append(comment)
        elif line.strip():
            after_print = False
    pieces = [piece.strip() for value in values for piece in value.split(": ")[0].split("...")]
    return [" ".join(piece.split()) for piece in pieces if piece.strip()]


def missing_output(expected, printed):
    """The first expected piece not found, in order, in what was printed (whitespace runs as one space)."""
    printed, at = " ".join(printed.split()), 0
    for piece in expected:
        found = printed.find(piece, at)
        if found < 0:
            return piece
        at = found + len(piece)
    return None


def python_examples():
    return [block for doc in EXAMPLE_DOCS for block in read_markdown(REPO / doc).blocks if block.language == "python"]


@pytest.mark.parametrize("block", python_examples(), ids=lambda block: f"{shown(block.path)}:{block.line}")
def test_python_examples_print_what_the_docs_say(block, monkeypatch):
    monkeypatch.chdir(REPO)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.text, f"{shown(block.path)}:{block.line + 1}", "exec"), {"__name__": "__doc_example__"})
    expected = expected_output(block)
    missing = missing_output(expected, printed.getvalue())
    assert missing is None, (f"{shown(block.path)}:{block.line}: the example does not print {missing!r}; it printed:"
                             f"\n{printed.getvalue()}")


def test_expected_output_is_read_from_print_comments():
    block = read_markdown_text("""```python
for family in ("a", "b"):
    print(family, 1 + 1)  # a 2: a note
    # not output: an indented comment
print("x" * 3)
# xxx
# ...tail of a long line
y = 2  # not output either
print(1,
      [2])
# 1 [2]
```""")
    assert expected_output(block) == ["a 2", "xxx", "tail of a long line", "1 [2]"]
    assert missing_output(["a 2", "xxx"], "a  2\nb 2\nxxx") is None
    assert missing_output(["xxx", "a 2"], "a 2\nxxx") == "a 2"  # order matters


def read_markdown_text(text):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "example.md"
        path.write_text(text)
        return read_markdown(path).blocks[0]
