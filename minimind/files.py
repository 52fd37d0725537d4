"""Files: writing them safely (through a temporary name and a rename, so a crash mid-write leaves the
previous file intact, with the permissions the user's umask gives, as any other program's files),
and a digest of their contents.
"""
import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Write a file through a temporary name in the same folder and rename it into place, so a
    crash mid-write leaves the previous file intact. `write(tmp_path)` writes the content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; the file should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def contents_digest(paths):
    """The SHA-256 hex digest of the files' contents, one after the other, read in 1 MiB blocks: the
    token cache's key (data/datasets.py) and the data fingerprint a resume compares (trainer.py)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
