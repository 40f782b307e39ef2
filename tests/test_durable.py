"""durable.py, the one atomic write: the content lands, a failure at any point leaves the old
content (or nothing) and no temp file, and a folder replacement is whole or absent at every
moment."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from matekd_ds import durable
from matekd_ds.durable import atomic_folder, fsync_path, write_atomic


class Boom(Exception):
    pass


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _contents(folder: Path) -> dict[str, str] | None:
    """{relative path: text} of every file under `folder`; None when it is absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Files


def test_text_and_bytes_land_and_replace_the_old_content(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(target, "first")
    assert target.read_text() == "first"
    write_atomic(str(target), b"\x00second\xff")
    assert target.read_bytes() == b"\x00second\xff"
    write_atomic(target, "caf\u00e9")
    assert target.read_bytes() == "caf\u00e9".encode()
    assert _listing(tmp_path) == ["out.json"]  # no temp file beside it


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def _half_then(error: type[BaseException]) -> type[io.FileIO]:
    """An open() for durable.py whose file takes half of what is written, then fails (a disk
    filling up mid-write)."""
    class HalfFile(io.FileIO):
        def write(self, data):
            super().write(data[: len(data) // 2])
            raise error("injected")

    return HalfFile


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt, OSError])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where, error):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise error("injected")

    if where == "write":
        monkeypatch.setattr(durable, "open", _half_then(error), raising=False)
    elif where == "fsync":
        monkeypatch.setattr(durable.os, "fsync", fail)
    else:
        monkeypatch.setattr(durable.os, "replace", fail)
    with pytest.raises(error):
        write_atomic(target, "new content, long enough to be cut in half")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["metrics.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "predictions.tsv", "id\tlabel\n")
    assert _listing(tmp_path) == []


def test_a_missing_folder_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "such" / "file", "x")
    assert _listing(tmp_path) == []


def test_fsync_path_takes_files_and_folders(tmp_path):
    (tmp_path / "f").write_text("x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Folders


def _fill(folder: Path, version: str, names: tuple[str, ...]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(version)


def test_a_new_folder_lands_whole_and_its_files_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = durable.fsync_path

    def recorded(path):
        synced.append(Path(path).name)
        real(path)

    monkeypatch.setattr(durable, "fsync_path", recorded)
    target = tmp_path / "student"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not target.exists()
        _fill(tmp, "new", ("config.json", "model.safetensors", "sub/vocab.txt"))
    assert _contents(target) == {"config.json": "new", "model.safetensors": "new", "sub/vocab.txt": "new"}
    assert _listing(tmp_path) == ["student"]
    assert {"config.json", "model.safetensors", "vocab.txt", "sub"} <= set(synced)
    assert synced[-1] == tmp_path.name  # the rename itself is made durable


def test_a_replacement_is_whole_or_absent_at_every_rename(tmp_path, monkeypatch):
    target = tmp_path / "student"
    target.mkdir()
    _fill(target, "old", ("config.json", "model.bin", "only-in-old.txt"))
    old = _contents(target)
    seen = []
    real = os.replace

    def watched(src, dst):
        real(src, dst)
        seen.append(_contents(target))

    monkeypatch.setattr(durable.os, "replace", watched)
    with atomic_folder(target) as tmp:
        _fill(tmp, "new", ("config.json", "model.safetensors"))
    new = {"config.json": "new", "model.safetensors": "new"}
    assert _contents(target) == new  # nothing of the old folder mixed in
    assert all(state in (old, new, None) for state in seen), seen
    assert _listing(tmp_path) == ["student"]  # neither the temp nor the old folder is left


def test_a_failure_while_filling_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    target = tmp_path / "student"
    target.mkdir()
    _fill(target, "old", ("config.json",))
    with pytest.raises(Boom), atomic_folder(target) as tmp:
        _fill(tmp, "new", ("config.json",))
        raise Boom("disk full")
    assert _contents(target) == {"config.json": "old"}
    assert _listing(tmp_path) == ["student"]


def test_a_failure_while_filling_a_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "student") as tmp:
        _fill(tmp, "new", ("config.json",))
        raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "student"
    target.mkdir()
    _fill(target, "old", ("config.json",))
    calls = []
    real = os.replace

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place, after the old one was moved aside
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(durable.os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output"), atomic_folder(target) as tmp:
        _fill(tmp, "new", ("config.json",))
    assert _contents(target) == {"config.json": "old"}
    assert _listing(tmp_path) == ["student"]
