"""Durable writes: the one way matekd-ds puts a file or a folder in place.

After a crash, a power loss or a full disk the target holds the old content or the new one,
whole, never a mix, and no temp file is left by a failure that Python sees (an exception, a
full disk, Ctrl-C). The temp file or folder is created beside the target (same filesystem, so
the rename is atomic), fsync'ed, renamed into place, and the folder holding it is fsync'ed so
that the rename itself survives a power loss. Only a process killed outright (kill -9) between
creating the temp and renaming it can leave one: a hidden `.NAME.<random>.tmp` beside the target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _beside(path: Path, kind: str) -> Path:
    # hidden, and unique: two writers of one target never share a temp
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """`path` holds `data` (text is written as UTF-8), or, if this fails, what it held before."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = _beside(path, "tmp")
    try:
        # O_EXCL: never write through a file (or a link) someone else put there; 0o666 less the umask,
        # as open() would give
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields an empty temp folder beside `path` to fill; when the block ends, its files and the
    folder are fsync'ed and it is renamed to `path`, replacing what was there. If the block (or
    the replacement) fails, the temp folder is removed and `path` is what it was.

    An existing `path` is first renamed aside and removed once the new one is in place: a crash
    between the two renames leaves `path` absent (the old folder sits beside it as a hidden
    `.NAME.<random>.old`), never a mix of old and new files."""
    path = Path(path)
    tmp = _beside(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = _beside(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old one back
                raise
            fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)  # the new folder is in place; the old one is only space
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
