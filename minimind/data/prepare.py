"""Preparing a data set: its records checked and tokenized once, by every core, into the token cache
(cache.py) that the datasets read.

    cache = prepare(CONVERSATIONS, ["data/sft_train.jsonl"], tokenizer)    # a TokenCache

The files are cut into chunks (1 MiB of a .jsonl file; 1000 records of other formats, which this
process reads); worker processes check each chunk's records (records.py), render and tokenize them
the way their record format needs (below), and this process writes their results in the order of the chunks,
so the cache is the same byte for byte whatever the number of workers. At most two chunks a worker
are in flight, so memory does not grow with the file. A progress bar shows the bytes done, the speed
and the time left; Ctrl-C or an error leaves no cache behind.

What each record format (records.FORMATS) writes for a record (cache.py describes the files):

    text           the document's ids and the separator <|endoftext|>     one sequence a record
    conversations  the conversation through the chat template, with which  one sequence, trained marks
                   tokens are trained (conversations.encode_trained)
    pairs          prompt + chosen, then prompt + rejected, each with the  two sequences, trained marks
                   reply's tokens marked
    prompts        the prompt up to the assistant header; the record         one sequence, the record
"""
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .cache import (SUMMARY, CacheWriter, TokenCache, cache_key, default_cache_dir, file_identity, partial_folder,
                    preparation_lock, token_dtype)
from .conversations import encode_trained, render_conversation
from .records import (CONVERSATIONS, FORMATS, PAIRS, PROMPTS, TEXT, BadRecord, SkippedRecords, bad_record_error,
                      check_file, check_record, expand_paths, file_kind, jsonl_values, no_usable_records, raw_values)
from .tokenizer import tokenizer_hash

CHUNK_BYTES = 1 << 20         # of a .jsonl file: one worker's task; a line longer than this grows the chunk
RECORDS_PER_CHUNK = 1000      # of the formats this process reads itself (.json, .txt, .parquet)
IN_PROCESS_BYTES = 8 << 20    # smaller inputs are prepared in this process: starting workers would cost more
CHUNKS_IN_FLIGHT = 2          # per worker: enough to keep it busy, few enough to bound the memory
QUIET_SECONDS = 30            # without a terminal, a progress line this often
# What the cache keeps beside the ids: which tokens train (conversations, pairs), and the records the
# rewards read (prompts).
KEEPS_TRAINED, KEEPS_RECORDS = (CONVERSATIONS, PAIRS), (PROMPTS,)


# ---------------------------------------------------------------- chunks of the files

@dataclass
class Chunk:
    file: int          # index of the file in the data set
    path: str
    first_line: int
    data: object       # bytes: whole lines of a .jsonl file; or [(line, value)] read by this process
    size: int          # bytes of the file it stands for (the progress bar's unit)


def chunks(paths):
    """The files cut into chunks, in order. A .jsonl file goes as raw lines (the workers parse
    them); other formats are parsed here (records.py) and go as values."""
    for number, path in enumerate(paths):
        if file_kind(path) == "jsonl":
            yield from jsonl_chunks(number, path)
            continue
        values, size = [], 0
        for line_number, value in raw_values(path):
            values.append((line_number, value))
            size += len(value["text"].encode("utf-8")) if isinstance(value, dict) and "text" in value else 0
            if len(values) == RECORDS_PER_CHUNK:
                yield Chunk(number, str(path), values[0][0], values, size)
                values, size = [], 0
        if values:
            yield Chunk(number, str(path), values[0][0], values, size)


def jsonl_chunks(number, path):
    line, rest = 1, b""
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK_BYTES), b""):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line ends in it yet
                rest = data
                continue
            yield Chunk(number, str(path), line, data[:cut], cut)
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
    if rest:
        yield Chunk(number, str(path), line, rest, len(rest))


# ---------------------------------------------------------------- what a worker does with a chunk

@dataclass
class EncodedChunk:
    file: int
    size: int
    good: int = 0                       # records that passed the checks
    lengths: np.ndarray = None          # tokens of each sequence
    ids: np.ndarray = None              # their ids, one after the other
    trained: np.ndarray = None          # uint8 marks of the trained tokens (SFT, DPO)
    first_trained: np.ndarray = None    # each sequence's first trained position, its length if none
    records: list = None                # GRPO: each prompt's record as JSON (bytes)
    skipped: SkippedRecords = field(default_factory=SkippedRecords)
    first_bad: tuple = None             # (line, problem) of the first skipped record
    error: tuple = None                 # ("record", line, problem) or ("user", message): stops the preparation


def document_separator(tokenizer):
    separator = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.eos_token_id)
    if separator is None:
        raise UserError("the tokenizer has neither <|endoftext|> nor an eos token to separate documents")
    return separator


class ChunkEncoder:
    """Checks a chunk's records and tokenizes them as their format needs; one in each worker process."""

    def __init__(self, tokenizer, record_format, skip_bad_records):
        self.tokenizer, self.record_format, self.skip_bad_records = tokenizer, record_format, skip_bad_records
        self.dtype = token_dtype(tokenizer)
        self.separator = document_separator(tokenizer) if record_format == TEXT else None

    def __call__(self, chunk):
        values = (jsonl_values(chunk.data.split(b"\n"), chunk.first_line) if isinstance(chunk.data, bytes)
                  else chunk.data)
        records, result = [], EncodedChunk(chunk.file, chunk.size)
        for line_number, value in values:
            try:
                records.append(check_record(value, self.record_format)[1])
            except BadRecord as bad:
                if not self.skip_bad_records:
                    result.error = ("record", line_number, bad.detail)
                    return result
                result.first_bad = result.first_bad or (line_number, bad.detail)
                result.skipped.add(bad.reason, f"{chunk.path}:{line_number}: {bad.detail}")
        try:
            sequences = getattr(self, f"encode_{self.record_format.name}")(records) if records else []
        except UserError as error:
            result.error = ("user", str(error))
            return result
        result.good = len(records)
        self.pack(result, sequences)
        return result

    def pack(self, result, sequences):
        """(ids, trained or None, record or None) per sequence -> the chunk's flat arrays."""
        result.lengths = np.fromiter((len(ids) for ids, _, _ in sequences), dtype=np.int64, count=len(sequences))
        result.ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _, _ in sequences), dtype=self.dtype,
                                 count=int(result.lengths.sum()))
        if self.record_format in KEEPS_TRAINED:
            marks = [trained for _, trained, _ in sequences]
            result.trained = np.concatenate(marks) if marks else np.zeros(0, dtype=np.uint8)
            result.first_trained = np.array([int(np.argmax(m)) if m.any() else len(m) for m in marks], dtype=np.int32)
        if self.record_format in KEEPS_RECORDS:
            result.records = [record for _, _, record in sequences]

    # one method a record format: records -> [(ids, trained marks or None, record JSON or None)]

    def encode_text(self, records):
        encodings = self.tokenizer.backend_tokenizer.encode_batch([r["text"] for r in records],
                                                                  add_special_tokens=False)
        return [(encoding.ids + [self.separator], None, None) for encoding in encodings]

    def encode_conversations(self, records):
        encoded = encode_trained(self.tokenizer, [r["messages"] for r in records],
                                 tools=[r.get("tools") for r in records])
        return [(ids, trained, None) for ids, trained in encoded]

    def encode_pairs(self, records):
        """prompt + chosen, prompt + rejected, for each pair in turn; only the replies trained."""
        conversations, train_from, tools = [], [], []
        for record in records:
            prompt = record["prompt_messages"]
            conversations += [prompt + record["chosen"], prompt + record["rejected"]]
            train_from += [len(prompt)] * 2
            tools += [record.get("tools")] * 2
        encoded = encode_trained(self.tokenizer, conversations, train_from, tools)
        return [(ids, trained, None) for ids, trained in encoded]

    def encode_prompts(self, records):
        """The prompt through the chat template up to the assistant header, as data/conversations.py's
        encode_chat renders it (the model writes the rest), and the record for the rewards."""
        texts = [render_conversation(self.tokenizer, r["prompt_messages"], r.get("tools"), add_generation_prompt=True,
                                     open_thinking=False) for r in records]
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [(encoding.ids, None, json.dumps(record, ensure_ascii=False).encode("utf-8"))
                for encoding, record in zip(encodings, records)]


WORKER = {}


def start_worker(tokenizer_file, format_name, skip_bad_records):
    """A worker process: its tokenizer from the file the main process wrote it to (our own pickle, in
    a private temporary folder), one tokenizer thread (the workers are the parallelism), Ctrl-C
    ignored (as inherited; also in a worker that the pool starts later in place of one)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    record_format = next(f for f in FORMATS if f.name == format_name)
    WORKER["encode"] = ChunkEncoder(pickle.loads(Path(tokenizer_file).read_bytes()), record_format, skip_bad_records)


def encode_in_worker(chunk):
    return WORKER["encode"](chunk)


@contextmanager
def workers_ignore_ctrl_c():
    """Ctrl-C ignored while the workers start (milliseconds: they fork and exec), so that they inherit
    it ignored: a terminal sends Ctrl-C to every process of the job, and a worker stopped while it
    starts would print a traceback. The main process stops the workers itself. (This is done before
    anything is written, so a Ctrl-C in those milliseconds, lost, costs nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Workers:
    """The processes that encode chunks (none: this process does), started on entering and stopped
    on leaving; `in_order(pieces)` yields each chunk encoded, in the order of `pieces`, with at most
    CHUNKS_IN_FLIGHT chunks a worker waiting or in progress."""

    def __init__(self, encoder, count):
        self.encoder, self.count, self.pool, self.folder = encoder, count, None, None

    def __enter__(self):
        if self.count:
            # spawn, not fork: a forked child would inherit the parent's threads (torch's, the tokenizer's).
            # The tokenizer goes through a file: passed to the pool, it would make each worker's start-up
            # message larger than a pipe holds, and starting the pool would wait on every worker's imports.
            self.folder = tempfile.TemporaryDirectory(prefix="minimind-prepare-")
            tokenizer_file = Path(self.folder.name) / "tokenizer.pickle"
            tokenizer_file.write_bytes(pickle.dumps(self.encoder.tokenizer))
            with workers_ignore_ctrl_c():
                self.pool = multiprocessing.get_context("spawn").Pool(
                    self.count, initializer=start_worker,
                    initargs=(str(tokenizer_file), self.encoder.record_format.name, self.encoder.skip_bad_records))
        return self

    def in_order(self, pieces):
        if self.pool is None:
            yield from map(self.encoder, pieces)
            return
        pending = deque()
        for piece in pieces:
            pending.append(self.pool.apply_async(encode_in_worker, (piece,)))
            if len(pending) >= CHUNKS_IN_FLIGHT * self.count:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.folder.cleanup()


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_workers(workers, total_bytes):
    """None: every core for a large input, none (this process) for a small one."""
    if workers is not None:
        return workers
    return available_cores() if total_bytes > IN_PROCESS_BYTES else 0


# ---------------------------------------------------------------- progress

def describe_seconds(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def describe_bytes(size):
    return f"{size / 1e6:,.1f} MB" if size < 1e9 else f"{size / 1e9:,.2f} GB"


class Progress:
    """A progress bar on a terminal (bytes, MB/s, time left, records); without one (a log file), a
    line every QUIET_SECONDS. Nothing for a short preparation in a log."""

    def __init__(self, total, what, enabled=True):
        self.total, self.what, self.done, self.records = total, what, 0, 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"Preparing {what}",
                            dynamic_ncols=True, leave=False, file=sys.stderr)
        self.enabled = enabled

    def update(self, size, records):
        self.done += size
        self.records += records
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.records:,} records", refresh=False)
            self.bar.update(size)
        elif self.enabled and time.perf_counter() - self.last_line >= QUIET_SECONDS:
            self.last_line = now = time.perf_counter()
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else 0
            print(f"Preparing {self.what}: {describe_bytes(self.done)} of {describe_bytes(self.total)} "
                  f"({self.done / max(self.total, 1):.0%}), {self.records:,} records, {rate / 1e6:.1f} MB/s, "
                  f"about {describe_seconds(left)} left", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class StopOnSigterm:
    """SIGTERM (a scheduler stopping the job) ends the preparation as Ctrl-C does, cleaning up."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    @staticmethod
    def handle(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ---------------------------------------------------------------- preparing a data set

def format_signature(record_format, tokenizer):
    """Everything beside the data that decides a cache: the record format, the tokenizer's vocabulary and
    merges, and what renders a record: the document separator, or the chat template and its special tokens."""
    signature = {"format": record_format.name, "tokenizer": tokenizer_hash(tokenizer),
                 "dtype": token_dtype(tokenizer).name}
    if record_format == TEXT:
        signature["separator"] = document_separator(tokenizer)
    else:
        signature["chat_template"] = tokenizer.chat_template
        signature["special_tokens"] = tokenizer.special_tokens_map
    return signature


def prepare(record_format, paths, tokenizer, cache_dir=None, skip_bad_records=False, workers=None, progress=True):
    """The TokenCache of `paths` (files, folders, globs) of `record_format` records: read back when an earlier run
    prepared it (`.hit`), else prepared now. workers: processes that tokenize (0: this one; None:
    every core for an input over IN_PROCESS_BYTES). progress: show a progress bar while preparing."""
    paths = expand_paths(paths)
    for path in paths:
        check_file(path)  # a missing, empty or binary file is named before anything else happens
    cache_dir = Path(cache_dir or default_cache_dir())
    key = cache_key(format_signature(record_format, tokenizer), paths, cache_dir)
    final = cache_dir / key
    if (final / SUMMARY).is_file():
        return TokenCache(final, hit=True)
    cache_dir.mkdir(parents=True, exist_ok=True)

    def waiting():
        print(f"Waiting for another process that is preparing the same data ({final})...", file=sys.stderr,
              flush=True)

    with preparation_lock(cache_dir, key, on_wait=waiting if progress else None):
        if (final / SUMMARY).is_file():  # the process we waited for prepared it
            return TokenCache(final, hit=True)
        write_cache(record_format, paths, tokenizer, cache_dir, key, skip_bad_records, workers, progress)
    return TokenCache(final, hit=False)


def write_cache(record_format, paths, tokenizer, cache_dir, key, skip_bad_records, workers, progress):
    start = time.perf_counter()
    identities = [file_identity(path) for path in paths]
    total = sum(identity["size"] for identity in identities)
    workers = choose_workers(workers, total)
    encoder = ChunkEncoder(tokenizer, record_format, skip_bad_records)
    files = [{"path": str(path), "bytes": identity["size"], "records": 0, "first_bad": None}
             for path, identity in zip(paths, identities)]
    skipped = SkippedRecords()
    what = paths[0].name if len(paths) == 1 else f"{len(paths)} files"
    bar = Progress(total, f"{what} ({record_format.description})", enabled=progress)
    try:
        writer = CacheWriter(cache_dir, key, encoder.dtype, trained=record_format in KEEPS_TRAINED,
                             records=record_format in KEEPS_RECORDS)
        with Workers(encoder, workers) as pool, StopOnSigterm(), writer:
            for encoded in pool.in_order(chunks(paths)):
                file = files[encoded.file]
                if encoded.error:
                    raise (bad_record_error(file["path"], *encoded.error[1:]) if encoded.error[0] == "record"
                           else UserError(encoded.error[1]))
                writer.add(encoded)
                skipped.merge(encoded.skipped)
                file["records"] += encoded.good
                file["first_bad"] = file["first_bad"] or encoded.first_bad
                bar.update(encoded.size, encoded.good + sum(encoded.skipped.values()))
            for file, identity in zip(files, identities):
                if file["records"] == 0:
                    raise no_usable_records(file["path"], file["first_bad"])
                if file_identity(file["path"]) != identity:
                    raise UserError(f"{file['path']} changed while it was being prepared; run again once it is "
                                    f"complete")
            writer.commit({"format": record_format.name, "dtype": encoder.dtype.name, "records": sum(f["records"] for f in files),
                           "skipped": dict(skipped), "skipped_examples": skipped.examples,
                           "sequences": writer.sequences, "tokens": writer.tokens,
                           "seconds": round(time.perf_counter() - start, 3), "workers": workers,
                           "files": [{k: v for k, v in f.items() if k != "first_bad"} for f in files]})
    except KeyboardInterrupt:
        shutil.rmtree(partial_folder(cache_dir, key), ignore_errors=True)  # if it came before the writer could
        raise UserError(f"stopped while preparing {what}: the partial cache was removed, nothing half-written "
                        f"is kept; the next run prepares it again") from None
    finally:
        bar.close()


def describe_cache(cache):
    """'1.07 GB in /root/.cache/minimind/tokens/KEY (prepared in 4 min 3 s by 2 workers)'"""
    summary = cache.summary
    how = "read from the cache" if cache.hit else (
        f"prepared in {describe_seconds(summary['seconds'])}"
        + (f" by {summary['workers']} worker{'s' if summary['workers'] != 1 else ''}" if summary["workers"] else ""))
    return f"cache {describe_bytes(cache.size_bytes)} in {cache.folder} ({how})"
