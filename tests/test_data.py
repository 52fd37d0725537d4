"""Readers, datasets and batching: formats, label masks token by token, the token cache, bad input."""
import importlib.util
import json
import random
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from minimind.commands import main as cli
from minimind.data.batching import batch_indices, collate, padding_waste
from minimind.data.datasets import DPODataset, PretrainDataset, SFTDataset
from minimind.data.records import expand_paths, normalize, read_records
from minimind.training.stages import detect_stage
from minimind.training.stages.dpo import pair_rows
from minimind.data.tokenizer import load_tokenizer, train_tokenizer
from minimind.errors import DataError, UserError

from .conftest import MINIMIND2_TOKENIZER, MINIMIND3_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- formats

def test_every_format_normalizes(tmp_path):
    pretrain = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    assert list(read_records(pretrain)) == [(1, {"text": "one"}), (2, {"text": "two"})]

    text = tmp_path / "b.txt"
    text.write_text("first doc\nline two\n\n\n  second doc\n", encoding="utf-8")
    assert list(read_records(text)) == [(1, {"text": "first doc\nline two"}), (5, {"text": "  second doc"})]

    array = tmp_path / "c.json"
    array.write_text('[\n  {"messages": [{"role": "user", "content": "q"},\n'
                     '                {"role": "assistant", "content": "a"}]},\n'
                     '  {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},'
                     ' {"role": "assistant", "content": "a"}]}\n]\n')
    records = list(read_records(array))
    assert [line for line, _ in records] == [2, 4]
    assert records[0][1] == {"messages": [user("q"), assistant("a")]}
    assert records[1][1]["messages"][0] == {"role": "system", "content": "s"}
    (tmp_path / "one.json").write_text('{\n  "text": "a single pretty-printed record"\n}\n')
    assert list(read_records(tmp_path / "one.json")) == [(1, {"text": "a single pretty-printed record"})]

    dpo = write_jsonl(tmp_path / "d.jsonl", [
        {"chosen": [user("q"), assistant("good.")], "rejected": [user("q"), assistant("bad")]},
        {"prompt": "q", "chosen": "good.", "rejected": "bad"},
    ])
    expected = {"prompt_messages": [user("q")], "chosen": [assistant("good.")], "rejected": [assistant("bad")]}
    assert [record for _, record in read_records(dpo)] == [expected, expected]


def test_grpo_prompts_normalize_and_bad_ones_are_named(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 3?", "answer": "5", "skill": "sum"},
        {"prompt": [{"role": "system", "content": "s"}, user("q")], "answer": "a"},
    ])
    records = [record for _, record in read_records(prompts)]
    assert records[0] == {"prompt_messages": [user("What is 2 + 3?")], "answer": "5",
                          "fields": {"prompt": "What is 2 + 3?", "answer": "5", "skill": "sum"}}
    assert records[1]["prompt_messages"] == [{"role": "system", "content": "s"}, user("q")]
    assert detect_stage([prompts]) == "grpo"
    bad = {
        '{"prompt": "q", "anwser": "a"}': 'a GRPO prompt needs an "answer" field (the reference answer the rewards '
                                          'check); did you mean "answer"?',
        '{"prompt": "q", "answer": 5}': '"answer" must be a string, got int',
        json.dumps({"prompt": [user("q"), assistant("a")], "answer": "a"}): '"prompt" must end with a user message',
        '{"promt": "q", "answer": "a"}': 'did you mean "prompt"?',
        json.dumps({"text": "t"}): "this is a pretraining record, but GRPO prompt records are expected here",
    }
    for line, message in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "q", "answer": "a"}\n' + line + "\n")
        with pytest.raises(DataError) as caught:
            list(read_records(path))
        assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value), str(caught.value)


def test_detect_stage_and_expand_paths(tmp_path):
    assert detect_stage([DATA / "pretrain.jsonl"]) == "pretrain"
    assert detect_stage([DATA / "sft_eval.jsonl"]) == "sft"
    assert detect_stage([DATA / "dpo_eval.jsonl"]) == "dpo"
    assert detect_stage([DATA / "grpo_eval.jsonl"]) == "grpo"
    (tmp_path / "notes.txt").write_text("plain text\n")
    assert detect_stage([tmp_path / "notes.txt"]) == "pretrain"
    assert expand_paths([str(DATA / "sft_*.jsonl")]) == [DATA / "sft_eval.jsonl", DATA / "sft_train.jsonl"]
    with pytest.raises(UserError, match="no files match"):
        expand_paths([str(tmp_path / "*.parquet")])
    with pytest.raises(UserError, match="data file not found"):
        expand_paths([str(tmp_path / "missing.jsonl")])


# ---------------------------------------------------------------- bad input

GOOD = json.dumps({"conversations": [user("q"), assistant("a")]})
BAD_LINES = {
    "invalid JSON": '{"conversations": [',
    "missing field": '{"conversation": []}',
    "wrong role": json.dumps({"conversations": [{"role": "human", "content": "q"}, assistant("a")]}),
    "empty conversation": '{"conversations": []}',
    "non-string content": json.dumps({"conversations": [{"role": "user", "content": ["q"]}, assistant("a")]}),
    "no assistant message": json.dumps({"conversations": [user("q")]}),
    "not an object": '["a list"]',
    "invalid UTF-8": '{"conversations": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
}
MESSAGES = {
    "invalid JSON": "invalid JSON",
    "missing field": 'found: "conversation"; did you mean "conversations"?',
    "wrong role": 'role "human"; expected one of system, user, assistant',
    "empty conversation": "empty conversation",
    "non-string content": "content must be a string, got list",
    "no assistant message": "no assistant message",
    "not an object": "expected a JSON object, got list",
    "invalid UTF-8": "lone surrogate",
}


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_records_name_file_line_and_problem(tmp_path, reason):
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{GOOD}\n\n{BAD_LINES[reason]}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_records(path))
    assert str(caught.value).startswith(f"{path}:3: ")
    assert MESSAGES[reason] in str(caught.value)
    assert "\n" not in str(caught.value)

    stats = {}
    assert len(list(read_records(path, skip_bad_records=True, stats=stats))) == 2
    assert stats == {reason: 1}


def test_json_errors_name_the_column_in_plain_words(tmp_path):
    lines = tmp_path / "cut.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": "no end}\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_records(lines))
    assert str(caught.value).startswith(f"{lines}:2: invalid JSON (Unterminated string starting at column 10) ")
    array = tmp_path / "cut.json"
    array.write_text('[\n {"text": "a"},\n {"text": "b\tc"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_records(array))
    assert str(caught.value) == f"{array}:3: invalid JSON (Invalid control character at column 13)"


def test_invalid_utf8_empty_and_binary_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid UTF-8"):
        list(read_records(broken))
    stats = {}
    assert len(list(read_records(broken, skip_bad_records=True, stats=stats))) == 1
    assert stats == {"invalid UTF-8": 1}

    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        list(read_records(tmp_path / "empty.jsonl"))
    (tmp_path / "model.bin.jsonl").write_bytes(b"\x80\x02\x00\x00binary")
    with pytest.raises(DataError, match="binary file"):
        list(read_records(tmp_path / "model.bin.jsonl"))
    (tmp_path / "bad.json").write_text('[\n {"text": "a"},\n {"text": 5}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: \"text\" must be a string"):
        list(read_records(tmp_path / "bad.json"))


def test_mixed_stages_and_mismatched_dpo_prompts(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "doc"}, {"conversations": [user("q"), assistant("a")]}])
    with pytest.raises(DataError, match="mixed.jsonl:2: this is an SFT record, but pretraining records"):
        list(read_records(mixed))
    pair = write_jsonl(tmp_path / "pair.jsonl", [
        {"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("b")]}])
    with pytest.raises(DataError, match="pair.jsonl:1: .*share the same prompt"):
        list(read_records(pair))
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match='half.jsonl:1: a preference pair needs both "chosen" and "rejected"'):
        list(read_records(half))


def test_cli_reports_bad_data_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{GOOD}\n{BAD_LINES['wrong role']}\n", encoding="utf-8")
    code = cli.main(["tokenizer", "train", "--data", str(path), "--vocab_size", "300", "--out", str(tmp_path / "t")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"error: {path}:2: ") and error.count("\n") == 1 and "Traceback" not in error

    code = cli.main(["tokenizer", "train", "--data", str(path), "--vocab_size", "300",
                     "--out", str(tmp_path / "t"), "--skip_bad_records"])
    assert code == 0
    assert f"skipped 1 bad record (1 wrong role); first: {path}:2: " in capsys.readouterr().out


# ---------------------------------------------------------------- SFT and DPO label masks

def pieces_to_expected(tokenizer, pieces):
    """(ids, labels) from (text, trained) pieces that each start at a special token or newline."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def test_sft_labels_are_the_assistant_tokens_token_by_token(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, user("What is 7 + 5?"), assistant("7 + 5 = 12."),
                    user("把 3 km 换算成米。"), assistant("3 km = 3000 m。\n  OK")]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": conversation}])
    item = SFTDataset([path], tokenizer, max_seq_len=512)[0]
    ids, labels = pieces_to_expected(tokenizer, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("7 + 5 = 12.<|im_end|>", True),
        ("\n<|im_start|>user\n把 3 km 换算成米。<|im_end|>\n<|im_start|>assistant\n", False),
        ("3 km = 3000 m。\n  OK<|im_end|>", True),
        ("\n", False),
    ])
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    trained = [token for token in item["labels"].tolist() if token != -100]
    assert tokenizer.decode(trained) == "7 + 5 = 12.<|im_end|>3 km = 3000 m。\n  OK<|im_end|>"


def test_sft_truncation_drops_samples_without_an_answer(tmp_path, tokenizer):
    long_question = user("word " * 200)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [long_question, assistant("A.")]},
                                                {"messages": [user("q"), assistant("A.")]}])
    dataset = SFTDataset([path], tokenizer, max_seq_len=64)
    assert len(dataset) == 1 and dataset.num_dropped == 1
    assert not dataset.stats  # not a bad record: a good one that does not fit
    assert dataset.lengths.tolist() == [len(dataset[0]["input_ids"])]
    assert all(length <= 64 for length in dataset.lengths)


def test_dpo_pairs_share_the_prompt_and_mask_the_responses(tmp_path, tokenizer):
    history = [user("hi"), assistant("Hello.")]  # an assistant turn inside the prompt is not trained
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"chosen": history + [user("2 + 2?"), assistant("2 + 2 = 4.")],
         "rejected": history + [user("2 + 2?"), assistant("Maybe five, I think")]}])
    item = DPODataset([path], tokenizer, max_seq_len=128)[0]
    for side, answer in (("chosen", "2 + 2 = 4."), ("rejected", "Maybe five, I think")):
        ids, labels = pieces_to_expected(tokenizer, [
            ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
             "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
             "<|im_start|>assistant\n", False),
            (answer + "<|im_end|>", True),
            ("\n", False),
        ])
        assert item[f"{side}_input_ids"].tolist() == ids
        assert item[f"{side}_labels"].tolist() == labels

    batch = collate([item, item], pair_rows)
    assert batch["input_ids"].shape[0] == 4
    assert torch.equal(batch["input_ids"][0, :len(item["chosen_input_ids"])], item["chosen_input_ids"])
    assert torch.equal(batch["labels"][2, :len(item["rejected_labels"])], item["rejected_labels"])


def test_collate_right_pads(tokenizer):
    short = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6])}
    long = {"input_ids": torch.tensor([7, 8, 9]), "labels": torch.tensor([7, 8, 9])}
    batch = collate([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, -100], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------- batching

def test_batch_indices_are_deterministic_and_cover_every_sample():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    first = batch_indices(lengths, 16, seed=3, epoch=2)
    assert first == batch_indices(lengths, 16, seed=3, epoch=2)
    assert first != batch_indices(lengths, 16, seed=3, epoch=3)
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    dropped = batch_indices(lengths, 16, seed=3, epoch=2, drop_last=True)
    assert all(len(batch) == 16 for batch in dropped) and len(dropped) == 1000 // 16
    plain = batch_indices(None, 4, seed=0, epoch=0, shuffle=False, group_by_length=False, num_samples=10)
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert padding_waste([[0, 1]], [2, 4]) == pytest.approx(0.25)


def test_an_epochs_batches_take_bytes_per_sample_not_python_lists():
    """Millions of samples an epoch (a 14 GB corpus is ~7M windows of 512): the batches are kept as
    arrays, not as lists of Python ints (~44 bytes a sample), read as lists one batch at a time."""
    lengths = np.random.default_rng(0).integers(10, 500, 2_000_000)
    tracemalloc.start()
    try:
        batches = batch_indices(lengths, 16, seed=0, epoch=0)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 10 * len(lengths)  # the order (8 bytes a sample) and each batch's start
    assert len(batches) == 125_000 and isinstance(batches[0], list) and len(batches[-1]) == 16
    assert batches[10:12] == [batches[10], batches[11]]


def test_padding_waste_on_bundled_sft_data_is_under_ten_percent(tokenizer):
    dataset = SFTDataset([DATA / "sft_train.jsonl"], tokenizer, max_seq_len=512)
    grouped = padding_waste(batch_indices(dataset.lengths, 16, seed=0, epoch=0), dataset.lengths)
    random_batches = padding_waste(batch_indices(dataset.lengths, 16, seed=0, epoch=0, group_by_length=False),
                                   dataset.lengths)
    assert grouped < 0.10 < random_batches


# ---------------------------------------------------------------- pretraining and the token cache

def test_pretrain_windows_and_cache_reuse(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"Document {i}: 你好, world."} for i in range(200)])
    first = PretrainDataset([corpus], tokenizer, max_seq_len=32)
    assert not first.cache_hit and first.cache_path.parent == tmp_path / "cache"
    expected = []
    for i in range(200):
        expected += tokenizer.encode(f"Document {i}: 你好, world.") + [0]  # <|endoftext|> after each document
    assert first.num_tokens == len(expected) and len(first) == len(expected) // 32
    assert first[1]["input_ids"].tolist() == expected[32:64]
    assert torch.equal(first[1]["labels"], first[1]["input_ids"])
    # the data set's cache, the files' digests and the preparation locks; no partial folder
    assert sorted(p.name for p in first.cache_path.parent.iterdir()) == sorted([first.cache_path.name, "files", "locks"])

    second = PretrainDataset([corpus], tokenizer, max_seq_len=64)
    assert second.cache_hit and second.cache_path == first.cache_path

    write_jsonl(corpus, [{"text": "changed"}] * 100)
    assert not PretrainDataset([corpus], tokenizer, max_seq_len=8).cache_hit

    other = train_tokenizer([corpus], vocab_size=280, out_dir=tmp_path / "tok")
    changed = PretrainDataset([corpus], other, max_seq_len=8)
    assert not changed.cache_hit and changed.cache_path != first.cache_path


def test_pretrain_rejects_sft_files(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="this is an SFT record, but pretraining records are expected"):
        PretrainDataset([DATA / "sft_eval.jsonl"], tokenizer, max_seq_len=32)
    # the failed run left no cache behind (only the file's digest and the lock it took)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["files", "locks"]


# ---------------------------------------------------------------- bundled demo data

DEMO_FILES = ["pretrain.jsonl", "sft_train.jsonl", "sft_eval.jsonl", "dpo_train.jsonl", "dpo_eval.jsonl",
              "grpo_train.jsonl", "grpo_eval.jsonl", "grpo_eval_system.jsonl"]


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", DATA / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_is_the_generators_output_for_its_seed(tmp_path, generator):
    generator.main(["--output_dir", str(tmp_path)])           # the default seed, 1234
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(DEMO_FILES)
    for name in DEMO_FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_the_generator_is_deterministic_for_a_seed_and_another_seed_is_another_world(tmp_path, generator):
    for folder, seed in (("a", 7), ("b", 7), ("c", 8)):
        generator.main(["--seed", str(seed), "--output_dir", str(tmp_path / folder)])
    for name in DEMO_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name
    # Another world, not another shuffle of the same one: its towns and people are others, with other
    # facts (names come from one list of the tokenizer's single tokens, so some names come back).
    def facts(folder):
        return {tuple(message["content"] for message in json.loads(line)["conversations"])
                for line in (tmp_path / folder / "sft_eval.jsonl").read_text().splitlines()
                if json.loads(line)["skill"] in ("town", "person")}
    assert len(facts("a") & facts("c")) < len(facts("a")) / 10
    # The same design: the same files, skills and sizes.
    for name in ("sft_eval.jsonl", "grpo_train.jsonl"):
        skills = [sorted({json.loads(line)["skill"] for line in (tmp_path / f / name).read_text().splitlines()})
                  for f in "ac"]
        assert skills[0] == skills[1], name


def test_conversations_in_the_pretraining_text_are_written_as_the_chat_template_renders_them(generator, tokenizer):
    # Pretraining's question-answer text is in the form evaluation prompts the model with, so the
    # generator's rendering must be the bundled template's, to the character.
    for messages in ([{"role": "user", "content": "What is Morka known for?"},
                      {"role": "assistant", "content": "Morka is famous for salt fish."}],
                     [{"role": "system", "content": "你是一个简洁的助手。"}, {"role": "user", "content": "计算 3 + 4。"},
                      {"role": "assistant", "content": "3 + 4 = 7。"}, {"role": "user", "content": "Add 1 and 2."},
                      {"role": "assistant", "content": "1 + 2 = 3."}]):
        assert generator.chat_text(messages) == tokenizer.apply_chat_template(messages, tokenize=False)


def user_questions(records):
    """The user turns of SFT conversations and of DPO pairs' prompts."""
    return {message["content"] for record in records for message in record.get("conversations", record.get("chosen"))
            if message["role"] == "user"}


def read_demo(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def chat_turns(text, role):
    """The contents of a role's turns in text written in the chat template."""
    return re.findall(rf"<\|im_start\|>{role}\n(.*?)<\|im_end\|>", text, flags=re.S)


def asked_fact(generator, question):
    """(name, fact) for a question about a town or a villager, (None, None) for any other question."""
    names = [word for word in re.findall(r"\w+", question) if word in generator.NAMES]
    if len(names) != 1:
        return None, None
    town = {"name": "X", "river": "R", "product": ("p", "p"), "founded": 1, "region": ("r", "r")}
    person = {"name": "X", "profession": ("painter", "p"), "town": "T"}
    template = re.sub(rf"\b{names[0]}\b", "X", question)
    for fact, wordings in {**generator.town_questions(town), **generator.person_questions(person)}.items():
        if any(asked == template for _, asked, _, _ in wordings):
            return names[0], fact
    return None, None


def test_held_out_questions_are_never_asked_in_sft_or_pretrainings_question_answer_text(generator):
    held_out = read_demo("sft_eval.jsonl")
    questions = [record["conversations"][0]["content"] for record in held_out]
    assert len(questions) == len(set(questions)) > 200
    asked_in_sft = user_questions(read_demo("sft_train.jsonl") + read_demo("dpo_train.jsonl") + read_demo("dpo_eval.jsonl"))
    chats = [record["text"] for record in read_demo("pretrain.jsonl") if record["text"].startswith("<|im_start|>")]
    asked_in_pretraining = {question for text in chats for question in chat_turns(text, "user")}
    assert len(asked_in_pretraining & asked_in_sft) > 300   # the SFT half's questions, in pretraining too
    assert not set(questions) & asked_in_sft
    assert not set(questions) & asked_in_pretraining
    assert not set(questions) & {record["prompt"][0]["content"] for record in read_demo("grpo_train.jsonl")}
    # Half are about facts only the pretraining prose states. A town's or a villager's fact: no
    # question of SFT or of the pretraining text's conversations asks it, in any wording or language
    # (other facts of the same town are asked: every name is one SFT answers about). A sum,
    # difference or conversion: its answer appears in no SFT answer and in no answer of the
    # pretraining text's conversations.
    only_pretraining = [record for record in held_out if record["known_from"] == "pretraining"]
    assert len(only_pretraining) * 2 == len(held_out)
    taught = {asked_fact(generator, question) for question in asked_in_sft | asked_in_pretraining}
    taught_names = {name for name, _ in taught}
    sft_answers = {message["content"] for record in read_demo("sft_train.jsonl")
                   for message in record["conversations"] if message["role"] == "assistant"}
    answered_in_pretraining = "\n".join(answer for text in chats for answer in chat_turns(text, "assistant"))
    entity_facts = 0
    for record in only_pretraining:
        question, answer = (message["content"] for message in record["conversations"])
        if record["skill"] in ("town", "person"):
            name, fact = asked_fact(generator, question)
            assert fact is not None and (name, fact) not in taught and name in taught_names, question
            entity_facts += 1
        else:
            assert not any(answer in sft_answer for sft_answer in sft_answers), answer
            assert answer not in answered_in_pretraining, answer
    assert entity_facts >= 40
    # Each held-out question has the same question in grpo_eval.jsonl, and with a system prompt in
    # grpo_eval_system.jsonl, with the same reference answer and skill.
    for system, name in ((False, "grpo_eval.jsonl"), (True, "grpo_eval_system.jsonl")):
        prompts = read_demo(name)
        assert [(p["prompt"][-1]["content"], p["answer"], p["skill"]) for p in prompts] == \
               [(c["conversations"][0]["content"], c["conversations"][1]["content"], c["skill"]) for c in held_out]
        assert all((p["prompt"][0]["role"] == "system") == system for p in prompts)


def test_a_file_with_no_usable_record_shows_the_first_problem_and_its_hint(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    record = {"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text((json.dumps(record) + "\n") * 3)
    code = cli.main(["train", "--data", str(path), "--skip_bad_records", "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert f"{path}:1:" in error and 'did you mean "conversations"?' in error and "no record in the file is usable" in error


# ---------------------------------------------------------------- tools and thinking (MiniMind-3's template)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                              "parameters": {"type": "object", "properties": {}}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Records in the shapes users have them, and the conversation (messages, tools) as the original
# MiniMind-3 code hands it to its chat template (lm_dataset.SFTDataset.create_chat_prompt).
TOOL_RECORDS = [
    ({"messages": [user("Weather in Paris?"),
                   {"role": "assistant", "content": None, "reasoning_content": "I need the weather tool.",
                    "tool_calls": [call("get_weather", '{"city": "Paris"}')]},
                   {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21, "sky": "clear"}'},
                   {"role": "assistant", "content": "It is 21 °C and clear in Paris.",
                    "reasoning_content": "The tool says 21 and clear."}],
      "tools": [WEATHER_TOOL, TIME_TOOL]}, None),
    # MiniMind-3's own data: tools as JSON text on the system message, tool calls as JSON text,
    # two calls in one turn answered by two consecutive tool messages, arguments as an object
    ({"conversations": [{"role": "system", "content": "You are a helpful assistant.",
                         "tools": json.dumps([WEATHER_TOOL, TIME_TOOL])},
                        user("北京和上海的天气？"),
                        {"role": "assistant", "content": "我来查一下。",
                         "tool_calls": json.dumps([call("get_weather", {"city": "北京"}),
                                                   call("get_weather", {"city": "上海"})], ensure_ascii=False)},
                        {"role": "tool", "content": '{"temp_c": 3}'}, {"role": "tool", "content": '{"temp_c": 9}'},
                        assistant("北京 3 °C，上海 9 °C。")]}, "system"),
    # thinking written inline in the content, and a plain turn before it
    ({"conversations": [user("hi"), assistant("Hello."), user("2 + 2?"),
                        assistant("<think>\nAdd them.\n</think>\n\n2 + 2 = 4.")]}, None),
]


def original_chat_prompt_inputs(record, tools_on):
    """What MiniMind-3's dataset code passes to apply_chat_template for `record`."""
    messages = [dict(m) for m in record.get("conversations") or record["messages"]]
    tools = record.get("tools")
    for message in messages:
        if tools_on == "system" and message.get("role") == "system" and message.get("tools"):
            tools = json.loads(message["tools"])
        if isinstance(message.get("tool_calls"), str):
            message["tool_calls"] = json.loads(message["tool_calls"])
    return messages, tools


@pytest.fixture(scope="module")
def minimind3_tokenizer():
    return load_tokenizer(MINIMIND3_TOKENIZER)


@pytest.mark.parametrize("number", range(len(TOOL_RECORDS)))
def test_tool_conversations_render_byte_identical_to_minimind3_template(tmp_path, minimind3_tokenizer, number):
    record, tools_on = TOOL_RECORDS[number]
    path = write_jsonl(tmp_path / "sft.jsonl", [record])
    item = SFTDataset([path], minimind3_tokenizer, max_seq_len=4096)[0]
    reference = AutoTokenizer.from_pretrained(str(MINIMIND3_TOKENIZER))
    messages, tools = original_chat_prompt_inputs(record, tools_on)
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False)
    assert minimind3_tokenizer.decode(item["input_ids"]) == expected
    assert item["input_ids"].tolist() == reference(expected)["input_ids"]


def labelled_pieces(tokenizer, item):
    """The text of each run of consecutive labelled tokens."""
    pieces, run = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != -100:
            run.append(token)
        elif run:
            pieces, run = pieces + [tokenizer.decode(run)], []
    return pieces + ([tokenizer.decode(run)] if run else [])


def test_tool_conversation_trains_thinking_content_and_tool_calls_never_tool_results(tmp_path, minimind3_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [TOOL_RECORDS[0][0], TOOL_RECORDS[1][0]])
    dataset = SFTDataset([path], minimind3_tokenizer, max_seq_len=4096)
    assert labelled_pieces(minimind3_tokenizer, dataset[0]) == [
        '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nThe tool says 21 and clear.\n</think>\n\nIt is 21 °C and clear in Paris.<|im_end|>"]
    assert labelled_pieces(minimind3_tokenizer, dataset[1]) == [
        '<think>\n\n</think>\n\n我来查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\n北京 3 °C，上海 9 °C。<|im_end|>"]
    text = minimind3_tokenizer.decode(dataset[0]["input_ids"])
    assert "<tool_response>\n{\"temp_c\": 21" in text and "# Tools" in text  # present, but not trained


def test_turns_found_by_scanning_agree_with_rendering(tmp_path, minimind3_tokenizer, tokenizer):
    """The fast scan and the exact cut renderings give the same spans; a literal assistant header inside
    a message defeats the scan, and the rendering then still finds the true turn."""
    from minimind.data.conversations import render_conversation, spans_by_rendering, spans_by_scanning
    records = [normalize(record)[1] for record, _ in TOOL_RECORDS]
    for record in records:
        text = render_conversation(minimind3_tokenizer, record["messages"], record.get("tools"))
        scanned = spans_by_scanning(record["messages"], text)
        assert scanned is not None
        assert scanned == spans_by_rendering(minimind3_tokenizer, record["messages"], record.get("tools"), text)
    tricky = [user("Quote a ChatML turn."), assistant("It looks like <|im_start|>assistant\nHi<|im_end|> in text.")]
    for tok in (tokenizer, minimind3_tokenizer):
        text = render_conversation(tok, tricky)
        assert spans_by_scanning(tricky, text) is None
        path = write_jsonl(tmp_path / "tricky.jsonl", [{"messages": tricky}])
        pieces = labelled_pieces(tok, SFTDataset([path], tok, max_seq_len=512)[0])
        assert pieces[0].endswith("It looks like <|im_start|>assistant\nHi<|im_end|> in text.<|im_end|>")


def test_template_without_tools_is_refused_not_silently_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [TOOL_RECORDS[0][0]])
    with pytest.raises(UserError, match="the tokenizer's chat template does not render tool definitions, tool calls, "
                                        "tool results, reasoning_content: training would silently drop them; use a "
                                        "tokenizer whose template does, such as MiniMind-3's"):
        SFTDataset([path], tokenizer, max_seq_len=512)
    # MiniMind2's original template renders tools but not reasoning_content
    minimind2 = load_tokenizer(MINIMIND2_TOKENIZER)
    with pytest.raises(UserError, match="does not render reasoning_content:"):
        SFTDataset([path], minimind2, max_seq_len=512)
    path = write_jsonl(tmp_path / "calls.jsonl", [TOOL_RECORDS[1][0]])
    assert len(SFTDataset([path], minimind2, max_seq_len=512)) == 1


BAD_TOOL_RECORDS = {
    "tool_calls on a user message": ([{"role": "user", "content": "q", "tool_calls": [call("f", "{}")]}, assistant("a")],
                                     'message 1 has "tool_calls", but only assistant messages carry it'),
    "no function name": ([user("q"), {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}],
                         "message 2 tool call 1 has no function name"),
    "arguments not JSON": ([user("q"), {"role": "assistant", "tool_calls": [call("f", "{city: Paris}")]}],
                           'message 2 tool call 1 ("f") arguments are not valid JSON'),
    "arguments a list": ([user("q"), {"role": "assistant", "tool_calls": [call("f", [1])]}],
                         "arguments must be a JSON object or a string of one, got list"),
    "tool_calls not a list": ([user("q"), {"role": "assistant", "tool_calls": "not json"}],
                              "message 2 tool_calls is a string but not valid JSON"),
    "reasoning not a string": ([user("q"), {"role": "assistant", "content": "a", "reasoning_content": 3}],
                               "message 2 reasoning_content must be a string, got int"),
    "tool result not a string": ([user("q"), assistant("a"), {"role": "tool", "content": {"t": 1}}],
                                 "message 3 content must be a string, got dict"),
}


@pytest.mark.parametrize("problem", list(BAD_TOOL_RECORDS))
def test_bad_tool_records_name_the_line_and_problem(tmp_path, problem):
    messages, message = BAD_TOOL_RECORDS[problem]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("q"), assistant("a")]}, {"messages": messages}])
    with pytest.raises(DataError) as caught:
        list(read_records(path))
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)
    bad_tools = write_jsonl(tmp_path / "tools.jsonl", [{"messages": [user("q"), assistant("a")], "tools": ["f"]}])
    with pytest.raises(DataError, match='tools.jsonl:1: "tools" entry 1 must be an object'):
        list(read_records(bad_tools))


def test_tool_records_normalize_to_openai_shape(tmp_path):
    records = [record for record, _ in TOOL_RECORDS]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    (_, first), (_, second), (_, third) = read_records(path)
    assert first["tools"] == [WEATHER_TOOL, TIME_TOOL] and second["tools"] == [WEATHER_TOOL, TIME_TOOL]
    assert first["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
                                    "tool_calls": [call("get_weather", '{"city": "Paris"}')]}
    assert first["messages"][2] == {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}', "tool_call_id": "c1"}
    assert second["messages"][2]["tool_calls"][1] == call("get_weather", {"city": "上海"})
    assert "tools" not in third and third["messages"][3] == assistant("<think>\nAdd them.\n</think>\n\n2 + 2 = 4.")
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Weather in Paris?", "tools": [WEATHER_TOOL],
                                                "chosen": [{"role": "assistant", "tool_calls": [call("get_weather", "{}")]}],
                                                "rejected": "I cannot know."}])
    assert next(read_records(dpo))[1]["tools"] == [WEATHER_TOOL]


def test_each_fact_is_stated_in_several_chinese_wordings_with_the_name_in_different_places(generator):
    """With two Chinese wordings a fact, both with the fact right after the name, the pretrained model
    completed those sentences yet answered 4 of 16 Chinese product questions (13 of 16 with four
    wordings; docs/training_guide.md, "The CPU session"): the bundled corpus states every town's and
    villager's facts 12 times a pass in Chinese, in several sentence forms (a town's not all with the name first)."""
    towns, people = generator.make_world(random.Random(generator.SEED))
    corpus = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()]
    sentences = Counter(sentence + "。" for text in corpus if "<|im_start|>" not in text
                        for sentence in text.split("。") if re.search(r"[\u4e00-\u9fff]", sentence))
    facts = [(town["name"], town[key][1], True) for town in towns for key in ("product", "region")]
    facts += [(person["name"], person["profession"][1], False) for person in people]
    for name, fact, is_town in facts:
        stating = [sentence for sentence in sentences
                   if re.search(rf"(^|[^A-Za-z]){name}([^A-Za-z]|$)", sentence) and fact in sentence]
        forms = {sentence.replace(name, "X") for sentence in stating}
        assert len(forms) >= 2, (name, fact, forms)   # each description draws one of the 3-4 at random
        assert not is_town or any(not form.startswith("X") for form in forms), (name, fact, forms)
        assert sum(sentences[sentence] for sentence in stating) >= 12, (name, fact)


def test_copy_practice_asks_about_numbers_outside_the_world(generator):
    """Copy practice: a sum, difference or conversion of numbers outside the world's tables (whose
    operands are single digits and counts up to 12) is stated, then asked; the answer copies the
    question's numbers and the stated result. Differences come most often, and half of them in the
    wording that names the subtrahend first, answered in the question's order (`Subtract 7 from 16.`
    -> `Subtracting 7 from 16 leaves 9.`), the one the CPU session's models missed; minuends under 20
    among them, not only large ones. SFT adds that wording alone on minuends under 20
    (`Subtract 12 from 15.`), every one of them."""
    def equation(answer):
        """(first operand or minuend, sign, second operand or subtrahend, result), or None."""
        if match := re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)[.。]", answer):
            return int(match[1]), match[2], int(match[3]), int(match[4])
        if match := re.fullmatch(r"Subtracting (\d+) from (\d+) leaves (\d+)\.", answer):
            return int(match[2]), "-", int(match[1]), int(match[3])
        return None

    def outside_tables(arithmetic, conversion):
        if conversion:
            return int(conversion[1]) > 12
        x, sign, y, z = arithmetic
        operands = (x, y) if sign == "+" else (z, y)    # a difference's table is of sums
        return not all(1 <= number <= 9 for number in operands)

    def practice(questions_and_answers):
        kinds = []
        for question, answer in questions_and_answers:
            arithmetic = equation(answer)
            conversion = re.fullmatch(r"(\d+) (km|kg|h) = \d+ (m|g|min)[.。]", answer)
            if (arithmetic or conversion) and outside_tables(arithmetic, conversion):
                assert all(number in question for number in re.findall(r"\d+", answer)), (question, answer)
                assert ("Subtract " in question) == answer.startswith("Subtracting "), (question, answer)
                kinds.append((arithmetic[1] if arithmetic else "conversion", question, arithmetic))
        return kinds
    sft = practice((r["conversations"][-2]["content"], r["conversations"][-1]["content"]) for r in read_demo("sft_train.jsonl"))
    chats = [record["text"] for record in read_demo("pretrain.jsonl") if record["text"].startswith("<|im_start|>")]
    pretraining = practice((chat_turns(text, "user")[-1], chat_turns(text, "assistant")[-1]) for text in chats)
    assert len(sft) == generator.COPY_PRACTICE[1] + generator.SUBTRACT_PRACTICE
    assert len(pretraining) == generator.COPY_PRACTICE[0]
    for kinds, alone in ((sft, generator.SUBTRACT_PRACTICE), (pretraining, 0)):  # alone: only `Subtract b from c.`
        counts = Counter(kind for kind, _, _ in kinds)
        assert set(counts) == {"+", "-", "conversion"} and counts["-"] > max(counts["+"], counts["conversion"])
        reversed_order = [(question, numbers) for kind, question, numbers in kinds if kind == "-" and "Subtract" in question]
        assert 0.35 < (len(reversed_order) - alone) / (counts["-"] - alone) < 0.65
        # answered in the question's order: `Subtract 7 from 16.` -> `Subtracting 7 from 16 leaves 9.`
        assert all(question.endswith(f"Subtract {y} from {c}.") and c - y == a for question, (c, _, y, a) in reversed_order)
        minuends = {numbers[0] for kind, _, numbers in kinds if kind == "-"}
        assert len({m for m in minuends if m < 20}) >= 8     # small ones too: `Subtract 9 from 15.` -> `15 - 9 = 6.`
    # and in SFT, that wording alone on every minuend from 2 to 19: `Subtract 12 from 15.`
    small = Counter(numbers[0] for kind, question, numbers in sft if kind == "-" and numbers[0] < 20
                    and question.endswith(f"Subtract {numbers[2]} from {numbers[0]}."))
    assert set(range(2, 20)) <= set(small) and sum(small.values()) >= generator.SUBTRACT_PRACTICE
