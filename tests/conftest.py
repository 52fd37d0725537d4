"""Fixtures and helpers that several test modules share: the bundled fixtures' paths, a token cache of
the test's own, small data files, a tiny model's training flags, and helpers to read a run's log and to
kill a run at a checkpoint."""
import json
import signal
from pathlib import Path

import pytest
import torch

from minimind.commands.train import main as train_main

# Trimmed copies of the original MiniMind fixtures; tests/fixtures/README.md says where each came from.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED_CHECKPOINTS = FIXTURES / "minimind2"
MINIMIND3_CHECKPOINTS = FIXTURES / "minimind3"
MINIMIND2_TOKENIZER = FIXTURES / "minimind2_tokenizer"
MINIMIND3_TOKENIZER = FIXTURES / "minimind3_tokenizer"


TINY = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "32", "--batch_size", "4", "--device", "cpu", "--report_to", "none", "--sample_tokens", "8"]


@pytest.fixture(scope="session")
def seed_checkpoints():
    return SEED_CHECKPOINTS


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_in_a_terminal():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt here and in the processes the tests start, as in a
    terminal: a shell script that starts pytest in the background (`cmd &`) starts it with SIGINT
    ignored, Python then installs no handler, and the tests of Ctrl-C would see nothing happen."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memorize(model, input_ids, steps, lr=3e-3):
    """Train `model` on one sequence until it reproduces it; returns the last loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss

@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    docs = [f"The river {name} runs past the town of {town}. It is {n} kilometres long." for n, (name, town) in
            enumerate([("Aun", "Velwen"), ("Mira", "Tosk"), ("Kel", "Brae"), ("Ost", "Lumen")] * 12)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = []
    for a in range(1, 41):
        rows.append({"conversations": [{"role": "user", "content": f"What is {a} + {a}?"},
                                       {"role": "assistant", "content": f"{2 * a}."},
                                       {"role": "user", "content": "And doubled?"},
                                       {"role": "assistant", "content": f"{4 * a}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def train_until_third_save(args, out, monkeypatch, partial_write=False):
    """Run train_main(args) into `out` and die (KeyboardInterrupt, as Ctrl-C outside the trainer's
    handler) at its third torch.save, after writing half a file there when partial_write."""
    import minimind.training.checkpoint as checkpoint
    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            if partial_write:
                Path(path).write_bytes(b"\x80\x02partial")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    assert train_main(args + ["--output_dir", str(out)]) == 130
    monkeypatch.setattr(checkpoint.torch, "save", real_save)


def pairs_file(tmp_path, count=24):
    path = tmp_path / "pairs.jsonl"
    rows = []
    for a in range(count):
        prompt = {"role": "user", "content": f"What is {a} + 1?"}
        rows.append({"chosen": [prompt, {"role": "assistant", "content": f"{a + 1}."}],
                     "rejected": [prompt, {"role": "assistant", "content": f"Well, it might be {a + 7} or so, hard to say"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
