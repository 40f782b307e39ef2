"""Checkpoints that survive a crash at any moment, are verified before they are trusted, and are
never executed.

Layout under <run>/checkpoints/<phase>/:
    <engine>/<tag>/...              DeepSpeed's own checkpoint of each engine (model, optimizer, scheduler)
    trainer/<tag>/state.json        the loop's position (step, evaluations, best)
    trainer/<tag>/rng_rank<r>.pt    each rank's RNG states (plain tensors and numbers)
    trainer/<tag>/MANIFEST.json     size and CRC-32 of every file above, written last
    LATEST                          the newest complete tag (for people; resume reads the manifests)

Saving: every file is written and fsync'ed, then the manifest, then LATEST, each renamed into
place atomically; a crash mid-save leaves a tag without a manifest, which is never loaded.
Resuming: tags are tried newest first; one whose manifest is missing or does not match its files
(truncated, flipped bytes, deleted, a file the manifest does not list) is skipped with a one-line
warning, and so is one that fails to load for any other reason. Loading unpickles nothing but
tensors, containers and plain values (`weights_only=True`, plus an explicit allowlist of the few
DeepSpeed classes its checkpoints hold): a planted pickle payload is refused, not run.

A manifest detects damage (a crash, a full disk, a bad copy), not forgery: whoever can rewrite a
file can rewrite the manifest too. What stops a forged file is the loading above.

Exports (student/, teacher/, ...) carry a manifest of the same kind (`write_export_manifest`,
`verify_export`), checked by everything that reads them back.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matekd_ds import distributed
from matekd_ds.durable import fsync_path, write_atomic
from matekd_ds.errors import MatekdError, RunFailed
from matekd_ds.monitor import log

MANIFEST = "MANIFEST.json"
TRAINER = "trainer"  # the folder of the loop's own files, beside the engines' folders
_CHUNK = 1 << 22


class CheckpointUnusable(RunFailed):
    """No checkpoint of a phase can be loaded. Not bad input (MatekdError, exit 2): the run
    directory holds what a run wrote, and the run ends as failed (exit 1)."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Loading without executing anything


def _deepspeed_checkpoint_classes() -> list[type]:
    """The non-tensor classes DeepSpeed's checkpoints hold (found by loading ZeRO 0-3 fp32/bf16
    checkpoints with weights_only=True): the loss scaler, the ZeRO stage enum, fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None) -> Any:
    """torch.load that refuses to run code: weights_only, with the DeepSpeed allowlist."""
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "not a checkpoint"
        raise MatekdError(f"checkpoint file {path} holds something other than tensors and plain values, "
                          f"refused to load it ({reason[:160]})") from None


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with safe_load (DeepSpeed's own checkpoint
    engine unpickles with weights_only=False). Every load of load_checkpoint goes through it."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or getattr(current, "matekd_safe", False):
        return
    if not isinstance(current, TorchCheckpointEngine):
        raise MatekdError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported; "
                          "remove the checkpoint engine settings from the DeepSpeed config")
    current.load = lambda path, map_location=None: safe_load(path, map_location)
    current.matekd_safe = True


# ---------------------------------------------------------------------------------------------
# RNG states as plain values


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Manifests


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _CHUNK
    except OSError:
        return False


def _mine(items: list, rank: int, world: int) -> list:
    """This rank's share of a list every rank sees in the same order."""
    return items[rank::world]


class Checkpointer:
    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = keep

    def latest_tag(self) -> str | None:
        pointer = self.root / "LATEST"
        text = pointer.read_text().strip() if pointer.is_file() else ""
        return text or None

    def folder(self, tag: str) -> Path:
        """The folder that names checkpoint `tag` on disk (its loop state and manifest)."""
        return self.root / TRAINER / tag

    def _tags(self) -> list[str]:
        folder = self.root / TRAINER
        return sorted((p.name for p in folder.iterdir() if p.name.startswith("step_")), reverse=True) \
            if folder.is_dir() else []

    def _files(self, names: list[str], tag: str) -> list[Path]:
        """Every file of checkpoint `tag`, but its manifest, in one order on every rank."""
        files: list[Path] = []
        for name in [*names, TRAINER]:
            folder = self.root / name / tag
            if folder.is_dir():
                files += sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        return files

    # -- saving

    def save(self, engines: dict[str, Any], step: int, trainer_state: dict[str, Any]) -> None:
        """Collective: every rank calls it. LATEST moves only after every rank's files are on
        disk and the manifest describing them is written."""
        tag = tag_of(step)
        trainer_dir = self.root / TRAINER / tag
        if distributed.is_main():  # what an interrupted save of this tag left must not mix in
            for name in [*engines, TRAINER]:
                shutil.rmtree(self.root / name / tag, ignore_errors=True)
        distributed.barrier()
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(str(self.root / name), tag=tag, save_latest=False)
            trainer_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), trainer_dir / f"rng_rank{distributed.rank()}.pt")
            distributed.barrier()
            if distributed.is_main():
                write_atomic(trainer_dir / "state.json", json.dumps(trainer_state, indent=2))
            distributed.barrier()
            self._write_manifest(list(engines), tag)
        except BaseException as err:
            full = _nearly_full(self.root)  # before the partial files are freed
            if distributed.is_main():  # an incomplete tag is never loaded; free its space
                for name in [*engines, TRAINER]:
                    shutil.rmtree(self.root / name / tag, ignore_errors=True)
            if isinstance(err, RuntimeError):  # torch.save reports a failed write (disk full) this way
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                code, why = (errno.ENOSPC, "No space left on device") if full else (errno.EIO, first)
                raise OSError(code, f"checkpoint {tag} could not be written ({why})", str(self.root)) from None
            raise
        if distributed.is_main():
            write_atomic(self.root / "LATEST", tag)
            self._prune(list(engines))
        distributed.barrier()

    def _write_manifest(self, names: list[str], tag: str) -> None:
        """Each rank fsyncs and checksums its share of the files; rank 0 writes the manifest."""
        files = self._files(names, tag)
        mine = {}
        for path in _mine(files, distributed.rank(), distributed.world_size()):
            fsync_path(path)
            mine[str(path.relative_to(self.root))] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
        entries: dict[str, Any] = {}
        for part in distributed.gather_objects(mine):
            entries.update(part)
        if distributed.is_main():
            for folder in {p.parent for p in files}:
                fsync_path(folder)
            write_atomic(self.root / TRAINER / tag / MANIFEST, json.dumps({"tag": tag, "files": entries}, indent=1))

    def _prune(self, names: list[str]) -> None:
        for old in self._tags()[self.keep:]:
            for name in [*names, TRAINER]:
                shutil.rmtree(self.root / name / old, ignore_errors=True)

    # -- resuming

    def verify(self, names: list[str], tag: str) -> str | None:
        """None when checkpoint `tag` is complete and every file matches its manifest, else why
        not. Collective: the ranks share the reading."""
        problem = None
        manifest_path = self.root / TRAINER / tag / MANIFEST
        try:
            entries = json.loads(manifest_path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            entries, problem = {}, "no readable manifest (an interrupted save)"
        on_disk = {str(p.relative_to(self.root)) for p in self._files(names, tag)}
        if problem is None:
            missing, unlisted = sorted(set(entries) - on_disk), sorted(on_disk - set(entries))
            if missing:
                problem = f"{missing[0]} is missing"
            elif unlisted:  # complete means: every file the engines will read is listed and verified
                problem = f"{unlisted[0]} is not in the manifest"
            elif not any(k.startswith(f"{name}/") for name in names for k in entries):
                problem = "the manifest lists no engine files"
        if problem is None:
            for rel in _mine(sorted(entries), distributed.rank(), distributed.world_size()):
                path, want = self.root / rel, entries[rel]
                if path.stat().st_size != want["size"]:
                    problem = f"{rel} has {path.stat().st_size} bytes, the manifest says {want['size']}"
                elif crc32_of(path) != want["crc32"]:
                    problem = f"{rel} does not match its checksum"
                if problem:
                    break
        problems = [p for p in distributed.gather_objects(problem) if p]
        return problems[0] if problems else None

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Restore every engine and this rank's RNG from the newest checkpoint that verifies and
        loads; returns the trainer state, or None when this phase has no complete checkpoint at
        all. Each one passed over is one warning line. Raises CheckpointUnusable when there are
        checkpoints but none can be used. Collective."""
        names = list(engines)
        rejected: list[str] = []
        for tag in self._tags():
            problem = self.verify(names, tag)
            state = None
            if problem is None:
                state, problem = self._try_load_tag(engines, tag)
            if problem is None:
                return state
            log.warning(f"checkpoint {self.folder(tag)} skipped: {problem}")
            if "interrupted save" not in problem:
                rejected.append(tag)
        if rejected:
            raise CheckpointUnusable(f"no checkpoint under {self.root} could be used ({', '.join(rejected)}); "
                                     "see the warnings above")
        return None

    def _try_load_tag(self, engines: dict[str, Any], tag: str) -> tuple[dict[str, Any] | None, str | None]:
        """(trainer state, None), or (None, why it failed to load): any error on any rank. The next
        tag's load restores every engine and the RNG anew, so a half-done load leaves nothing behind."""
        state, problem = None, None
        try:
            state = self._load_tag(engines, tag)
        except Exception as err:  # a planted pickle, a file DeepSpeed cannot read, a changed layout
            text = str(err).strip().splitlines()
            problem = f"it could not be loaded ({type(err).__name__}: {text[0][:300] if text else ''})"
        problems = [p for p in distributed.gather_objects(problem) if p]
        return (state, None) if not problems else (None, problems[0])

    def _load_tag(self, engines: dict[str, Any], tag: str) -> dict[str, Any]:
        for name, engine in engines.items():
            use_safe_loading(engine)
            path, _ = engine.load_checkpoint(str(self.root / name), tag=tag)
            if path is None:
                raise MatekdError(f"DeepSpeed found no checkpoint in {self.root / name / tag}")
        trainer_dir = self.folder(tag)
        rng_file = trainer_dir / f"rng_rank{distributed.rank()}.pt"
        if rng_file.is_file():  # a resume on a different world size keeps fresh RNG for new ranks
            set_rng_state(safe_load(rng_file))
        state = json.loads((trainer_dir / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json does not hold the loop state")
        return state


# ---------------------------------------------------------------------------------------------
# Exports: a manifest beside the files a loader reads

# Not covered: the model card (rewritten after the export, when the final metrics are known) and
# hidden files (a temp file an interrupted card write left; loaders never read them).
_UNCOVERED = (MANIFEST, "README.md")


def _export_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in _UNCOVERED and not p.name.startswith(".")}


def write_export_manifest(folder: Path) -> None:
    """MANIFEST.json in an export folder being written (before it is fsync'ed and renamed)."""
    entries = {rel: {"size": p.stat().st_size, "crc32": crc32_of(p)} for rel, p in _export_files(folder).items()}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_export(folder: str | Path) -> None:
    """A model folder this project exported must still match its manifest; one that has none (a
    model from elsewhere, or exported by an older version) is taken as it is. Raises MatekdError
    naming the first file that differs."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
        entries = {str(rel): (int(want["size"]), str(want["crc32"])) for rel, want in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MatekdError(f"{manifest} is not a readable export manifest: the export is damaged") from None
    on_disk = _export_files(folder)
    problem = None
    if missing := sorted(set(entries) - set(on_disk)):
        problem = f"{missing[0]} is missing"
    elif unlisted := sorted(set(on_disk) - set(entries)):
        problem = f"{unlisted[0]} is not in its manifest"
    else:
        for rel, (size, crc) in entries.items():
            if on_disk[rel].stat().st_size != size or crc32_of(on_disk[rel]) != crc:
                problem = f"{rel} does not match its manifest"
                break
    if problem:
        raise MatekdError(f"model {folder} is damaged: {problem} (size and CRC-32 recorded when it was exported)")
