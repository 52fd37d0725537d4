"""Writing files safely: through a temporary name and a rename, so a crash mid-write leaves the
previous file intact, with the permissions the user's umask gives (as any other program's files).
"""
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
