"""The token caches (data/cache.py, data/prepare.py) and the datasets that read them: the same samples
as the in-memory datasets they replaced, the same bytes whatever the number of workers, nothing
half-written after an interruption, memory that does not grow with the file, a second start that
trusts what it knows of a file only while the file looks unchanged."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimind.data import cache as cache_module
from minimind.data import prepare as prepare_module
from minimind.data.cache import content_digest
from minimind.data.datasets import DPODataset, PretrainDataset, PromptDataset, SFTDataset
from minimind.data.prepare import prepare
from minimind.data.records import CONVERSATIONS
from minimind.data.tokenizer import load_tokenizer
from minimind.errors import DataError, UserError
from minimind.training.schedule import split_validation, validation_batches
from minimind.training.stages import detect_stage

from .conftest import MINIMIND3_TOKENIZER
from .reference_datasets import reference_dpo, reference_prompts, reference_sft
from .test_data import TOOL_RECORDS, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
spec = importlib.util.spec_from_file_location("make_scale_data", ROOT / "bench" / "make_scale_data.py")
make_scale_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_scale_data)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def minimind3_tokenizer():
    return load_tokenizer(MINIMIND3_TOKENIZER)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def scale_file(path, kind, size, seed=0, plain=False):
    make_scale_data.write(kind, size, path, seed=seed, plain=plain)
    return path


def tool_file(tmp_path):
    """MiniMind-3-style conversations: tools on the system message, tool calls, thinking."""
    records = [record for record, _ in TOOL_RECORDS] * 3
    return write_jsonl(tmp_path / "tools.jsonl", records)


# ---------------------------------------------------------------- the same samples as before the caches

def sft_items(dataset):
    items = (dataset[index] for index in range(len(dataset)))
    return [(item["input_ids"].tolist(), item["labels"].tolist()) for item in items]


@pytest.mark.parametrize("max_seq_len", [512, 30])
def test_cached_sft_gives_the_in_memory_samples(cache_dir, tokenizer, max_seq_len):
    dataset = SFTDataset([DATA / "sft_train.jsonl"], tokenizer, max_seq_len)
    expected, dropped = reference_sft([DATA / "sft_train.jsonl"], tokenizer, max_seq_len)
    assert sft_items(dataset) == expected
    assert dataset.num_dropped == dropped and (dropped > 0) == (max_seq_len == 30)
    assert dataset.lengths.tolist() == [len(ids) for ids, _ in expected]


def test_cached_sft_of_tool_and_thinking_conversations_gives_the_in_memory_samples(cache_dir, tmp_path,
                                                                                   minimind3_tokenizer):
    paths = [tool_file(tmp_path), scale_file(tmp_path / "scale.jsonl", "sft", 300_000)]
    for max_seq_len in (4096, 200):
        dataset = SFTDataset(paths, minimind3_tokenizer, max_seq_len)
        expected, dropped = reference_sft(paths, minimind3_tokenizer, max_seq_len)
        assert sft_items(dataset) == expected and dataset.num_dropped == dropped
    assert dropped > 0 and dataset.cache_hit  # the second length read the same cache


def test_cached_dpo_gives_the_in_memory_pairs(cache_dir, tmp_path, tokenizer):
    paths = [DATA / "dpo_train.jsonl", scale_file(tmp_path / "dpo.jsonl", "dpo", 100_000)]
    for max_seq_len in (512, 36):   # 36: some pairs of the bundled persona prompts fit, some do not
        dataset = DPODataset(paths, tokenizer, max_seq_len)
        expected, dropped = reference_dpo(paths, tokenizer, max_seq_len)
        items = [dataset[i] for i in range(len(dataset))]
        assert [((i["chosen_input_ids"].tolist(), i["chosen_labels"].tolist()),
                 (i["rejected_input_ids"].tolist(), i["rejected_labels"].tolist())) for i in items] == \
            [(tuple(map(list, c)), tuple(map(list, r))) for c, r in expected]
        assert dataset.num_dropped == dropped
    assert dropped > 0


def test_cached_prompts_give_the_in_memory_prompts_and_records(cache_dir, tmp_path, tokenizer):
    rlaif = scale_file(tmp_path / "rlaif.jsonl", "rlaif", 30_000)
    for paths in ([DATA / "grpo_train.jsonl"], [rlaif]):
        dataset = PromptDataset(paths, tokenizer, 26)
        expected, dropped = reference_prompts(paths, tokenizer, 26)
        items = [dataset[i] for i in range(len(dataset))]
        assert [(item["input_ids"].tolist(), item["record"]) for item in items] == expected
        assert all(set(item["labels"].tolist()) == {-100} for item in items)
        assert dataset.num_dropped == dropped > 0
    assert detect_stage([rlaif]) == "grpo" and items[0]["record"]["answer"] is None


# ---------------------------------------------------------------- preparation in parallel

def cache_files(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.name != "summary.json"}


def test_the_cache_is_the_same_with_one_and_two_workers(tmp_path, minimind3_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 16 << 10)  # many chunks from a small file
    good = scale_file(tmp_path / "sft.jsonl", "sft", 200_000)
    lines = good.read_bytes().splitlines(keepends=True)
    lines[50:50] = [b'{"conversations": [{"role": "user", "content": "no answer"}]}\n', b"{not json\n"]
    with_bad = tmp_path / "with_bad.jsonl"
    with_bad.write_bytes(b"".join(lines))
    caches = [prepare(CONVERSATIONS, [with_bad], minimind3_tokenizer, cache_dir=tmp_path / f"cache{workers}",
                      skip_bad_records=True, workers=workers) for workers in (0, 1, 2)]
    assert len(caches[0]) > 100 and caches[0].summary["skipped"] == {"no assistant message": 1, "invalid JSON": 1}
    assert caches[0].summary["skipped_examples"][1].startswith(f"{with_bad}:52: invalid JSON")
    for other in caches[1:]:
        assert cache_files(other.folder) == cache_files(caches[0].folder)
        assert {k: v for k, v in other.summary.items() if k not in ("seconds", "workers")} == \
            {k: v for k, v in caches[0].summary.items() if k not in ("seconds", "workers")}
    # without the flag, a worker's bad record stops the preparation with its file and line, and no cache
    with pytest.raises(DataError, match=f"{with_bad}:51: .*no assistant message"):
        prepare(CONVERSATIONS, [with_bad], minimind3_tokenizer, cache_dir=tmp_path / "refused", workers=2)
    assert sorted(p.name for p in (tmp_path / "refused").iterdir()) == ["files", "locks"]


# ---------------------------------------------------------------- interruptions

PREPARE_SCRIPT = """
import sys
from minimind.data import prepare as p
from minimind.data.records import CONVERSATIONS
from minimind.data.tokenizer import load_tokenizer
from minimind.errors import UserError
p.CHUNK_BYTES = 1 << 14
try:
    p.prepare(CONVERSATIONS, [sys.argv[1]], load_tokenizer(), cache_dir=sys.argv[2], workers=int(sys.argv[3]))
except UserError as error:  # as the command line shows it: one line, the error's exit code
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
"""


def start_preparation(data, cache, workers):
    """A preparation in another process, returned once its partial cache folder exists."""
    process = subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, str(data), str(cache), str(workers)],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(Path(cache).glob("*.partial-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.01)
    return process


def entries(cache):
    return sorted(p.name for p in Path(cache).iterdir() if p.name not in ("files", "locks"))


def test_an_interrupted_preparation_leaves_no_cache(tmp_path, tokenizer):
    data = scale_file(tmp_path / "sft.jsonl", "sft", 3_000_000, plain=True)
    process = start_preparation(data, tmp_path / "cache", workers=2)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: to the run and its workers
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped while preparing sft.jsonl" in err and "Traceback" not in err
    assert entries(tmp_path / "cache") == []  # neither a partial folder nor a complete-looking one

    process = start_preparation(data, tmp_path / "cache", workers=0)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: the partial folder stays, under its own name
    process.wait(timeout=60)
    assert [name.split(".")[1].startswith("partial-") for name in entries(tmp_path / "cache")] == [True]
    cache = prepare(CONVERSATIONS, [data], tokenizer, cache_dir=tmp_path / "cache", workers=0)  # starts again, cleans up
    assert not cache.hit and entries(tmp_path / "cache") == [cache.folder.name]


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import resource, sys, torch
from minimind.data import prepare
from minimind.data.datasets import SFTDataset
from minimind.data.tokenizer import load_tokenizer
prepare.CHUNK_BYTES = 1 << 18  # both files span several chunks, so that both measure a chunk's working memory

def anonymous_mib():  # the process's own memory; file pages mapped from the cache are not counted
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024

tokenizer = load_tokenizer()
SFTDataset(["{warm}"], tokenizer, 512, cache_dir=sys.argv[2], workers=0)  # everything imported and warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
dataset = SFTDataset([sys.argv[1]], tokenizer, 512, cache_dir=sys.argv[2], workers=0)
preparing = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
start = anonymous_mib()
for index in range(len(dataset)):   # an epoch's reads, as training does them
    item = dataset[index]
reading = anonymous_mib() - start
print(preparing, reading, dataset.cache.num_tokens)
"""


def test_memory_does_not_grow_with_the_file(tmp_path):
    """Preparing a file 8 times larger takes no more memory (the in-memory datasets took about 70
    bytes a token), and reading every sample of the cache keeps nothing."""
    warm = scale_file(tmp_path / "warm.jsonl", "sft", 100_000, plain=True)
    measured = []
    for size in (600_000, 4_800_000):
        data = scale_file(tmp_path / f"sft{size}.jsonl", "sft", size, seed=size, plain=True)
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.replace("{warm}", str(warm)), str(data),
                              str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert out.returncode == 0, out.stderr
        measured.append([float(x) for x in out.stdout.split()])
    (small_prep, _, small_tokens), (large_prep, large_read, large_tokens) = measured
    assert large_tokens > 7 * small_tokens
    growth = large_prep - small_prep
    assert growth < 20, f"preparing {large_tokens:,} tokens took {growth:.0f} MiB more than {small_tokens:,}"
    assert large_read < 20, f"reading every sample kept {large_read:.0f} MiB"
    assert 70 * (large_tokens - small_tokens) / 2**20 > 3 * 20  # what the in-memory datasets would have grown


# ---------------------------------------------------------------- knowing a file without reading it again

def test_a_second_start_reads_a_sample_of_the_file_and_notices_changes(tmp_path, monkeypatch, tokenizer):
    cache = tmp_path / "cache"
    data = scale_file(tmp_path / "big.jsonl", "sft", 3_000_000, plain=True)
    hashed = []
    real = cache_module.contents_digest
    monkeypatch.setattr(cache_module, "contents_digest", lambda paths: hashed.extend(paths) or real(paths))
    first = content_digest(data, cache)
    assert content_digest(data, cache) == first and len(hashed) == 1  # trusted: size, mtime, inode, 16 blocks
    os.utime(data)  # touched: hashed again, the same contents, so the same digest (and the same cache)
    assert content_digest(data, cache) == first and len(hashed) == 2
    blocks = data.read_bytes()
    status = data.stat()
    changed = blocks[:100] + b"X" + blocks[101:]  # an edit in the first sampled block, mtime restored
    data.write_bytes(changed)
    os.utime(data, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert content_digest(data, cache) != first and len(hashed) == 3
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "a"}] * 10)  # under 1 MiB: sampled whole
    digest, status = content_digest(small, cache), small.stat()
    small.write_text(small.read_text().replace('"a"', '"b"'))
    os.utime(small, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert content_digest(small, cache) != digest


def test_a_cache_made_with_skip_bad_records_is_refused_without_the_flag(cache_dir, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]}] * 3)
    path.write_text(path.read_text() + "{bad\n")
    assert SFTDataset([path], tokenizer, 64, skip_bad_records=True).stats == {"invalid JSON": 1}
    with pytest.raises(UserError, match=f"{path}:4: invalid JSON.*--skip_bad_records"):
        SFTDataset([path], tokenizer, 64)
    assert len(list(cache_dir.glob("*/summary.json"))) == 1  # one cache, the same for both runs


def test_offsets_give_lengths_without_reading_the_samples(cache_dir, tokenizer):
    dataset = SFTDataset([DATA / "sft_eval.jsonl"], tokenizer, 512)
    assert dataset.cache.maps == {}  # no token read yet: the lengths came from the offsets
    assert dataset.lengths.tolist() == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert np.array_equal(dataset.token_counts, dataset.lengths)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "grpo"])
def test_validation_reads_a_bounded_sample_of_every_stage(cache_dir, tokenizer, stage):
    """A held-out split of any size is validated on at most --eval_max_tokens tokens (pretraining
    windows included: they have no per-sample lengths, all are max_seq_len long)."""
    makers = {"pretrain": (PretrainDataset, "pretrain.jsonl"), "sft": (SFTDataset, "sft_train.jsonl"),
              "dpo": (DPODataset, "dpo_train.jsonl"), "grpo": (PromptDataset, "grpo_train.jsonl")}
    make, name = makers[stage]
    _, held_out = split_validation(make([DATA / name], tokenizer, 64), 0.5, seed=0)
    batches = validation_batches(held_out, 2000, batch_size=8)
    used = sum(len(held_out[i]["input_ids" if stage != "dpo" else "chosen_input_ids"]) for b in batches for i in b)
    assert 0 < used <= 2000 < sum(len(held_out[i]["input_ids" if stage != "dpo" else "chosen_input_ids"])
                                  for i in range(len(held_out)))
