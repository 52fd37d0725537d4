"""The tokenizer: exact round trips, MiniMind2 compatibility, training and its command line."""
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from minimind.commands import main as cli
from minimind.data.tokenizer import CHAT_TEMPLATE, DEFAULT_TOKENIZER_DIR, load_tokenizer, train_texts, train_tokenizer
from minimind.errors import UserError

from .conftest import MINIMIND2_TOKENIZER as MINIMIND2_DIR

TRICKY_TEXTS = [
    "",
    "hello world",
    "  two leading spaces, three   inside,\ttab\t\tand trailing  ",
    "windows\r\nline endings\r\n\r\n",
    "\n\n\nonly newlines first",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji 🙂👍🏽🇨🇳 and ZWJ 👩‍💻",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "literal specials <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "mixed 中文 and English 123,456.789 ½ ∑ \u00a0nbsp \u3000ideographic space",
    "rare bytes \x00\x01\x7f and \U0001F600 \U00010000",
]


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer()


@pytest.fixture(scope="module")
def minimind2():
    return load_tokenizer(MINIMIND2_DIR)


def test_bundled_tokenizer_has_minimind_special_tokens(bundled):
    assert len(bundled) == 6400
    assert bundled.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (bundled.pad_token_id, bundled.bos_token_id, bundled.eos_token_id) == (0, 1, 2)
    assert bundled.unk_token == "<|endoftext|>"
    assert bundled.encode("hi") == bundled.encode("hi", add_special_tokens=False)  # no bos/eos added
    sizes = sum(path.stat().st_size for path in DEFAULT_TOKENIZER_DIR.iterdir())
    assert sizes < 1_000_000


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_is_exact(bundled, minimind2, text):
    for tokenizer in (bundled, minimind2):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_literal_special_token_strings_encode_as_special_tokens(bundled):
    ids = bundled.encode("a<|im_end|>b")
    assert 2 in ids and bundled.decode(ids) == "a<|im_end|>b"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_on_any_text(bundled, text):
    assert bundled.decode(bundled.encode(text)) == text


def test_minimind2_tokenizer_gives_the_same_ids_as_autotokenizer(minimind2):
    reference = AutoTokenizer.from_pretrained(str(MINIMIND2_DIR))
    for text in TRICKY_TEXTS:
        assert minimind2.encode(text) == reference.encode(text)
    # Pinned ids, as MiniMind2 itself produces them.
    assert minimind2.encode("<|im_start|>user\n")[0] == 1
    assert minimind2.encode("hello") == [5125, 338]


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
     {"role": "user", "content": "把 km 换算成 m。"}, {"role": "assistant", "content": "1 km = 1000 m。"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"},
     {"role": "assistant", "content": "  spaced\n\nanswer "}, {"role": "user", "content": "last"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "b"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_minimind2(bundled, minimind2, messages, add_generation_prompt):
    ours = bundled.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    theirs = minimind2.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    if messages[0]["role"] != "system":
        assert ours.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n")


def test_bundled_config_carries_the_template():
    config = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE


def write_corpus(folder):
    poem = {"text": "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。"}
    prose = {"text": "Odd   whitespace\there,\r\nand a trailing space \n\n  indented."}
    chat = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [poem, prose, chat] * 20) + "\n",
                    encoding="utf-8")
    (folder / "notes.txt").write_text("first document\nstill first\n\nsecond 文档 🙂\n", encoding="utf-8")
    return [path, folder / "notes.txt"]


def test_train_tokenizer_round_trips_and_loads_with_autotokenizer(tmp_path):
    files = write_corpus(tmp_path)
    tokenizer = train_tokenizer(files, vocab_size=320, out_dir=tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    reference = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in TRICKY_TEXTS:
        assert reference.decode(reference.encode(text)) == text
        assert tokenizer.encode(text) == reference.encode(text)
    assert reference.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert len(tokenizer) == 320


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    files = write_corpus(tmp_path)
    code = cli.main(["tokenizer", "train", "--data", str(tmp_path / "*.jsonl"), str(files[1]),
                     "--vocab_size", "300", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "2 file(s)" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "out")) == 300


@pytest.mark.parametrize("arguments, message", [
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file or folder"),
    (["--data", "CORPUS", "--vocab_size", "100"], "argument --vocab_size: must be an integer in [259, 1048576], got 100"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, arguments, message):
    corpus = str(write_corpus(tmp_path)[0])
    arguments = [corpus if argument == "CORPUS" else argument for argument in arguments]
    code = cli.main(["tokenizer", "train", *arguments, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and message in error and "Traceback" not in error


def test_load_tokenizer_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_learns_from_grpo_prompts_and_minimind_rl_prompt_sets_too(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4."}) + "\n" + json.dumps(
        {"conversations": [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": ""}]}) + "\n")
    assert list(train_texts([path])) == ["user\nWhat is 2 + 2?", "assistant\n4.", "user\nName a river."]


def test_a_text_longer_than_model_max_length_encodes_without_transformers_warning(capfd, caplog):
    """The server and the datasets window long inputs themselves: transformers' "Token indices sequence
    length is longer than the specified maximum" (against tokenizer_config.json's model_max_length)
    must not reach the user's log."""
    tokenizer = load_tokenizer()
    ids = tokenizer("word " * (tokenizer.model_max_length + 10))["input_ids"]
    assert len(ids) > tokenizer.model_max_length
    captured = capfd.readouterr()
    assert "Token indices sequence length" not in captured.err + captured.out + caplog.text
