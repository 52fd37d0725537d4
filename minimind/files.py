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
        follow_umask(tmp)  # mkstemp makes it private; the file should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give a file, or every file under a folder, the mode the user's umask gives new files (0644
    under the usual 022). Some writers make their files private (0600): tempfile.mkstemp, and
    safetensors' save_file (model.safetensors, peft's adapter_model.safetensors)."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else (item for item in path.rglob("*") if item.is_file()):
        os.chmod(file, mode)
    return path


def contents_digest(paths):
    """The SHA-256 hex digest of the files' contents, one after the other, read in 1 MiB blocks: the
    token cache's key (data/datasets.py) and the data fingerprint a resume compares (trainer.py)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
