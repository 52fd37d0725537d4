"""The token cache on disk: every data set tokenized once, named by what it holds, read back through
memory maps, so that neither preparing nor training keeps a data set in memory.

    CACHE/KEY/                   one prepared data set (a folder, renamed into place when complete)
        ids.uint16               every token id, sequence after sequence (uint32 above 65536 tokens)
        offsets.int64            where each sequence starts in ids, and one more entry: the end
        trained.uint8            (SFT, DPO) 1 where a token is trained on, else 0
        first_trained.int32      (SFT, DPO) each sequence's first trained position (its length if none)
        records.jsonl            (GRPO) each prompt's record, for the rewards, one a line,
        record_offsets.int64     and where each line starts
        summary.json             what preparing it found: records read and skipped, tokens, the files
    CACHE/files/HASH.json        a data file's identity (path, size, mtime, inode, sampled bytes) and its SHA-256
    CACHE/locks/KEY              held by the process preparing KEY; another one waits, then reads it

CACHE is $MINIMIND_CACHE, or ~/.cache/minimind/tokens. KEY is a hash of the cache format, the record format,
the tokenizer (and for conversations its chat template) and the SHA-256 of each data file's contents:
the same data and tokenizer give the same cache, any change a new one.

A file's SHA-256 is computed once, when the file is first seen; later runs trust it while the file
keeps its path, size, modification time and inode and the same bytes in 16 blocks sampled through
it (the whole file when it is under 1 MiB), so a second start reads 1 MiB of a 1 GB file, not all of
it. Anything that rewrites a file changes its modification time and makes it hashed again; only an
edit that keeps the size, restores the modification time and misses the sampled blocks would go
unseen (`touch FILE` makes it hashed again; a file whose contents are unchanged keeps its cache).
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_write, contents_digest
from .records import SkippedRecords

CACHE_FORMAT_VERSION = 2   # bump when the layout or what a record format writes changes
SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 16, 1 << 16
SUMMARY = "summary.json"

try:
    import fcntl   # POSIX: one process prepares a data set while the others wait for it
except ImportError:  # Windows: two processes may prepare the same data at once; the first rename wins
    fcntl = None


def default_cache_dir():
    """$MINIMIND_CACHE, else ~/.cache/minimind/tokens (data folders may be read-only)."""
    return Path(os.environ.get("MINIMIND_CACHE") or Path.home() / ".cache" / "minimind" / "tokens")


def token_dtype(tokenizer):
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------- what a file holds, without reading it again

def sampled_digest(path, size):
    """SHA-256 of SAMPLED_BLOCKS blocks spread evenly through the file, the first and last included:
    the whole file when it is smaller than they are."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        if size <= SAMPLED_BLOCKS * SAMPLED_BLOCK_BYTES:
            digest.update(file.read())
            return digest.hexdigest()
        last = size - SAMPLED_BLOCK_BYTES
        for block in range(SAMPLED_BLOCKS):
            file.seek(last * block // (SAMPLED_BLOCKS - 1))
            digest.update(file.read(SAMPLED_BLOCK_BYTES))
    return digest.hexdigest()


def file_identity(path):
    status = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "inode": status.st_ino, "device": status.st_dev}


def content_digest(path, cache_dir=None):
    """The SHA-256 of a file's contents: remembered in CACHE/files/ with the file's identity and
    trusted while both still hold (see the module docstring), else computed and remembered."""
    identity = file_identity(path)
    stamp = Path(cache_dir or default_cache_dir()) / "files" / (
        hashlib.sha256(identity["path"].encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(stamp.read_text())
        if ({k: known.get(k) for k in identity} == identity
                and known.get("sampled") == sampled_digest(path, identity["size"])):
            return known["sha256"]
    except (OSError, ValueError):
        pass  # no stamp yet, or an unreadable one: hash the file
    known = {**identity, "sampled": sampled_digest(path, identity["size"]), "sha256": contents_digest([path])}
    if file_identity(path) == identity:  # not changed while it was read
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp, lambda tmp: Path(tmp).write_text(json.dumps(known)))
    return known["sha256"]


def data_fingerprint(paths, cache_dir=None):
    """One digest of several files' contents (a checkpoint keeps it, so a resume can tell a change)."""
    digests = [content_digest(path, cache_dir) for path in paths]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:32]


def cache_key(signature, paths, cache_dir=None):
    """The name of the cache of `paths` prepared the way `signature` (a JSON-able value) describes."""
    parts = [CACHE_FORMAT_VERSION, signature, [content_digest(path, cache_dir) for path in paths]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- writing one data set's cache

@contextmanager
def preparation_lock(cache_dir, key, on_wait=None):
    """Held while this process prepares `key`: another process that needs the same data waits
    here (on_wait() tells the user once), then finds the cache ready. Released if the process dies."""
    if fcntl is None:
        yield
        return
    path = Path(cache_dir) / "locks" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class CacheWriter:
    """Appends encoded sequences to a new cache under a temporary name; `commit` renames it into
    place. Leaving the `with` block without committing (an error, Ctrl-C) removes it: no half cache
    is ever found under a cache's name. Call under preparation_lock: partial folders of the same key
    left by a killed process are removed first."""

    def __init__(self, cache_dir, key, dtype, trained, records):
        self.final = Path(cache_dir) / key
        self.folder = partial_folder(cache_dir, key)
        self.dtype = np.dtype(dtype)
        self.names = [f"ids.{self.dtype.name}", "offsets.int64"]
        self.names += ["trained.uint8", "first_trained.int32"] if trained else []
        self.names += ["records.jsonl", "record_offsets.int64"] if records else []
        self.files = {}
        self.tokens = self.sequences = self.record_bytes = 0

    def __enter__(self):
        try:
            for stale in self.final.parent.glob(f"{self.final.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.folder.mkdir(parents=True)
            for name in self.names:
                self.files[name.split(".")[0]] = open(self.folder / name, "wb")
        except BaseException:  # Ctrl-C in the middle included: nothing stays behind
            self.__exit__()
            raise
        return self

    def add(self, chunk):
        """Append one chunk's sequences (an EncodedChunk of data/prepare.py)."""
        starts = self.tokens + np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]]).astype(np.int64)
        self.files["offsets"].write(starts[:len(chunk.lengths)].tobytes())
        self.files["ids"].write(np.ascontiguousarray(chunk.ids, dtype=self.dtype).tobytes())
        if "trained" in self.files:
            self.files["trained"].write(chunk.trained.tobytes())
            self.files["first_trained"].write(chunk.first_trained.astype(np.int32).tobytes())
        if "records" in self.files:
            lines = [record + b"\n" for record in chunk.records]
            line_starts = self.record_bytes + np.concatenate([[0], np.cumsum([len(x) for x in lines])[:-1]])
            self.files["record_offsets"].write(line_starts.astype(np.int64)[:len(lines)].tobytes())
            self.files["records"].write(b"".join(lines))
            self.record_bytes += sum(len(x) for x in lines)
        self.tokens += int(chunk.lengths.sum())
        self.sequences += len(chunk.lengths)

    def commit(self, summary):
        """Close the files, write summary.json last, and rename the folder into place."""
        self.files["offsets"].write(np.array([self.tokens], dtype=np.int64).tobytes())
        if "records" in self.files:
            self.files["record_offsets"].write(np.array([self.record_bytes], dtype=np.int64).tobytes())
        for file in self.files.values():
            file.close()
        (self.folder / SUMMARY).write_text(json.dumps(summary, ensure_ascii=False, indent=1))
        try:
            os.rename(self.folder, self.final)
        except OSError:
            if not (self.final / SUMMARY).is_file():  # not another process that finished first: a real error
                raise

    def __exit__(self, *exc):
        for file in self.files.values():
            file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def partial_folder(cache_dir, key):
    """Where this process writes the cache `key` until it is complete."""
    return Path(cache_dir) / f"{key}.partial-{os.getpid()}"


# ---------------------------------------------------------------- reading one back

def folder_size(folder):
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())


class TokenCache:
    """A prepared data set, read back: offsets and per-sequence arrays in memory (a few bytes a
    sequence), token ids and labels through memory maps opened on first use (so that the object
    pickles cheaply into DataLoader workers)."""

    def __init__(self, folder, hit):
        self.folder, self.hit = Path(folder), hit
        self.summary = json.loads((self.folder / SUMMARY).read_text())
        self.dtype = np.dtype(self.summary["dtype"])
        self.offsets = np.fromfile(self.folder / "offsets.int64", dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        trained = self.folder / "first_trained.int32"
        self.first_trained = np.fromfile(trained, dtype=np.int32) if trained.is_file() else None
        self.size_bytes = folder_size(self.folder)
        self.maps = {}

    def __len__(self):
        return len(self.lengths)

    @property
    def num_tokens(self):
        return int(self.offsets[-1])

    def array(self, name, dtype):
        """The memory map of one of the cache's files, opened on first use."""
        if name not in self.maps:
            path = self.folder / f"{name}.{np.dtype(dtype).name}"
            self.maps[name] = (np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
                               else np.zeros(0, dtype=dtype))
        return self.maps[name]

    @property
    def ids(self):
        return self.array("ids", self.dtype)

    def sequence(self, index, limit=None):
        """Sequence `index`'s ids (and trained marks, None without them), its first `limit` tokens."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if limit is not None:
            end = min(end, start + limit)
        trained = self.array("trained", np.uint8)[start:end] if self.first_trained is not None else None
        return self.ids[start:end], trained

    def record(self, index):
        """GRPO: the normalized record of prompt `index`."""
        offsets = self.array("record_offsets", np.int64)
        with open(self.folder / "records.jsonl", "rb") as file:
            file.seek(int(offsets[index]))
            return json.loads(file.read(int(offsets[index + 1] - offsets[index])))

    def skipped_records(self, skip_bad_records):
        """What --skip_bad_records skipped when the cache was made. A run without the flag refuses a
        cache that skipped records, as it would refuse the file itself."""
        skipped = SkippedRecords()
        skipped.update(self.summary["skipped"])
        skipped.examples = self.summary["skipped_examples"]
        if skipped and not skip_bad_records:
            raise UserError(f"{skipped.examples[0]} (--skip_bad_records skips such records)")
        return skipped

    def __getstate__(self):
        return {**self.__dict__, "maps": {}}
