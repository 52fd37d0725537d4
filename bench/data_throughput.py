"""Data preparation throughput: the token cache's preparation against the tokenizer's own limit.

For pretraining text and for SFT conversations, in one process, alternating, it times
(a) `prepare()`, exactly what a training run does the first time it meets a file: read it in chunks,
    check every record, render conversations through the chat template, tokenize, mark the trained
    tokens, write the cache (worker processes over chunks, --workers of them), and
(b) the baseline: the raw `tokenizers` encode_batch (Rust, on every core) of the same texts, held in
    memory beforehand: the documents' text, or the conversations already rendered. No reading,
    checking, rendering or writing: the limit a preparation could reach.
Both produce the same tokens, so the ratio of their tokens/s is the share of the limit reached.

    python bench/data_throughput.py                           # 50 MB files made by make_scale_data.py
    python bench/data_throughput.py --size 200MB --reps 2
    python bench/data_throughput.py --sft my_sft.jsonl --pretrain my_text.jsonl --workers 2

SFT uses the MiniMind-3 tokenizer (its template renders the tool calls and thinking in MiniMind's SFT
data); pretraining the bundled one. Medians over --reps; the load average is printed beside them.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import make_scale_data  # noqa: E402
from minimind.data.conversations import render_conversation  # noqa: E402
from minimind.data.prepare import available_cores, describe_seconds, prepare  # noqa: E402
from minimind.data.records import CONVERSATIONS, TEXT, read_records  # noqa: E402
from minimind.data.tokenizer import load_tokenizer  # noqa: E402

MINIMIND3_TOKENIZER = ROOT / "tests" / "fixtures" / "minimind3_tokenizer"
# MiniMind's published files (its README), to say what the measured speed means for them
MINIMIND_SETS = {"pretrain": [("pretrain_t2t_mini.jsonl", 1.2e9), ("pretrain_t2t.jsonl", 10e9)],
                 "sft": [("sft_t2t_mini.jsonl", 1.6e9), ("sft_t2t.jsonl", 14e9)]}
RECORDS = {"pretrain": TEXT, "sft": CONVERSATIONS}  # what each kind of file holds


def baseline_texts(stage, path, tokenizer):
    """The strings the tokenizer turns into the cache's tokens: documents, or rendered conversations."""
    texts = []
    for _, record in read_records(path, expected=RECORDS[stage]):
        texts.append(record["text"] if stage == "pretrain" else
                     render_conversation(tokenizer, record["messages"], record.get("tools")))
    return texts


def time_baseline(tokenizer, texts):
    """Seconds and tokens of encode_batch over all texts, in batches as large as a preparation chunk's."""
    backend, tokens = tokenizer.backend_tokenizer, 0
    start = time.perf_counter()
    for first in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in backend.encode_batch(texts[first:first + 1000], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def time_prepare(stage, path, tokenizer, workers, scratch):
    """Seconds of one preparation into a fresh cache folder, and the tokens it wrote."""
    cache_dir = Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    cache = prepare(RECORDS[stage], [path], tokenizer, cache_dir=cache_dir, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    separators = len(cache) if stage == "pretrain" else 0  # the <|endoftext|> after each document
    return seconds, cache.num_tokens - separators


def measure(stage, path, tokenizer, workers, reps, scratch):
    size = Path(path).stat().st_size
    texts = baseline_texts(stage, path, tokenizer)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ours, base = [], []
    for _ in range(reps):
        base.append(time_baseline(tokenizer, texts))
        ours.append(time_prepare(stage, path, tokenizer, workers, scratch))
    (base_s, tokens), (ours_s, our_tokens) = (statistics.median(b[0] for b in base), base[0][1]), \
        (statistics.median(o[0] for o in ours), ours[0][1])
    assert tokens == our_tokens, f"the baseline made {tokens} tokens, the preparation {our_tokens}"
    return {"stage": stage, "file": str(path), "file_mb": size / 1e6, "text_mb": text_bytes / 1e6,
            "records": len(texts), "tokens": tokens, "workers": workers,
            "ours_s": ours_s, "ours_mb_s": size / 1e6 / ours_s, "ours_tok_s": tokens / ours_s,
            "base_s": base_s, "base_mb_s": text_bytes / 1e6 / base_s, "base_tok_s": tokens / base_s,
            "ratio": base_s / ours_s}


def print_table(rows):
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("| data | records | tokens | preparation | MB/s | tokens/s | baseline tokens/s (MB/s of text) "
          "| ratio | workers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} {r['file_mb']:.0f} MB | {r['records']:,} | {r['tokens']:,} | {r['ours_s']:.1f} s | "
              f"{r['ours_mb_s']:.2f} | {r['ours_tok_s']:,.0f} | {r['base_tok_s']:,.0f} ({r['base_mb_s']:.2f}) | "
              f"{r['ratio']:.2f} | {r['workers']} |")
    print()
    for r in rows:
        for name, size in MINIMIND_SETS[r["stage"]]:
            seconds = size / 1e6 / r["ours_mb_s"]
            print(f"{name} ({size / 1e9:g} GB): about {describe_seconds(seconds)} to prepare at "
                  f"{r['ours_mb_s']:.2f} MB/s (the baseline's limit: {describe_seconds(seconds * r['ratio'])})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", help="an SFT .jsonl file [made by make_scale_data.py, --size]")
    parser.add_argument("--pretrain", help="a pretraining .jsonl file [made by make_scale_data.py, --size]")
    parser.add_argument("--size", type=make_scale_data.parse_size, default=make_scale_data.parse_size("50MB"))
    parser.add_argument("--workers", type=int, default=available_cores(), help="preparation processes [every core]")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--scratch", default=None, help="folder for the files and caches [a temporary one]")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows = []
        for stage, given, tokenizer in (("pretrain", args.pretrain, load_tokenizer()),
                                        ("sft", args.sft, load_tokenizer(MINIMIND3_TOKENIZER))):
            path = given or Path(scratch) / f"{stage}.jsonl"
            if not given:
                make_scale_data.write(stage, args.size, path)
            rows.append(measure(stage, path, tokenizer, args.workers, args.reps, scratch))
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
