"""Checkpoints that survive a crash at any moment.

Layout under <run>/checkpoints/<phase>/:
    <engine>/<tag>/...       DeepSpeed's own checkpoint of each engine (model, optimizer, scheduler)
    trainer/<tag>/state.json the loop's position (step, evaluations, best)
    trainer/<tag>/rng_rank<r>.pt  each rank's RNG states (dropout)
    LATEST                   the tag of the newest complete checkpoint, replaced atomically last

A checkpoint is only ever read through LATEST, and LATEST only moves after every engine and every
rank has finished writing, so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matekd_ds import distributed


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = keep

    def latest_tag(self) -> str | None:
        pointer = self.root / "LATEST"
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, engines: dict[str, Any], step: int, trainer_state: dict[str, Any]) -> None:
        """Collective: every rank calls it."""
        tag = _tag(step)
        for name, engine in engines.items():
            engine.save_checkpoint(str(self.root / name), tag=tag)
        trainer_dir = self.root / "trainer" / tag
        trainer_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), trainer_dir / f"rng_rank{distributed.rank()}.pt")
        distributed.barrier()
        if distributed.is_main():
            write_atomic(trainer_dir / "state.json", json.dumps(trainer_state, indent=2))
            write_atomic(self.root / "LATEST", tag)
            self._prune(engines)
        distributed.barrier()

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Restore every engine and this rank's RNG; returns the trainer state, or None."""
        tag = self.latest_tag()
        if tag is None:
            return None
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(str(self.root / name), tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {self.root / name / tag} could not be loaded")
        trainer_dir = self.root / "trainer" / tag
        rng_file = trainer_dir / f"rng_rank{distributed.rank()}.pt"
        if rng_file.is_file():  # a resume on a different world size keeps fresh RNG for new ranks
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((trainer_dir / "state.json").read_text())

    def _prune(self, engines: dict[str, Any]) -> None:
        tags = sorted(p.name for p in (self.root / "trainer").iterdir() if p.name.startswith("step_"))
        for old in tags[: -self.keep]:
            for name in [*engines, "trainer"]:
                shutil.rmtree(self.root / name / old, ignore_errors=True)
