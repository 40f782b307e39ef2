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
(truncated, flipped bytes, deleted) is skipped with a one-line warning. Loading unpickles nothing
but tensors, containers and plain values (`weights_only=True`, plus an explicit allowlist of the
few DeepSpeed classes its checkpoints hold): a planted pickle payload is refused, not run.
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
from matekd_ds.errors import MatekdError
from matekd_ds.monitor import log

MANIFEST = "MANIFEST.json"
TRAINER = "trainer"  # the folder of the loop's own files, beside the engines' folders
_CHUNK = 1 << 22


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
            if distributed.is_main():  # an incomplete tag is never loaded; free its space
                for name in [*engines, TRAINER]:
                    shutil.rmtree(self.root / name / tag, ignore_errors=True)
            if isinstance(err, RuntimeError):  # torch.save reports a failed write (disk full) this way
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OSError(errno.EIO, f"checkpoint {tag} could not be written ({first})", str(self.root)) from None
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
            missing = sorted(set(entries) - on_disk)
            if missing:
                problem = f"{missing[0]} is missing"
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
        """Restore every engine and this rank's RNG from the newest verified checkpoint; returns
        the trainer state, or None when this phase has no complete checkpoint at all."""
        names = list(engines)
        tags = self._tags()
        rejected: list[str] = []
        for tag in tags:
            problem = self.verify(names, tag)
            if problem is None:
                return self._load_tag(engines, tag)
            log.warning(f"checkpoint {self.root / TRAINER / tag} skipped: {problem}")
            if "interrupted save" not in problem:
                rejected.append(tag)
        if rejected:
            raise MatekdError(f"no checkpoint under {self.root} passed verification ({', '.join(rejected)}); "
                              "see the warnings above")
        return None

    def _load_tag(self, engines: dict[str, Any], tag: str) -> dict[str, Any]:
        for name, engine in engines.items():
            use_safe_loading(engine)
            path, _ = engine.load_checkpoint(str(self.root / name), tag=tag)
            if path is None:
                raise MatekdError(f"checkpoint {self.root / name / tag} could not be loaded")
        trainer_dir = self.root / TRAINER / tag
        rng_file = trainer_dir / f"rng_rank{distributed.rank()}.pt"
        if rng_file.is_file():  # a resume on a different world size keeps fresh RNG for new ranks
            set_rng_state(safe_load(rng_file))
        try:
            return json.loads((trainer_dir / "state.json").read_text())
        except ValueError as err:
            raise MatekdError(f"checkpoint {trainer_dir}: state.json is not valid JSON ({err})") from None
