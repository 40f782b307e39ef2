"""Checkpoints are verified before they are trusted and never executed (in-process, tiny engines).

Every kind of damage a crash, a full disk or a bad copy can do to the newest checkpoint makes the
resume skip it (one warning line naming it) and load the previous one, damage the manifest does
not cover too; a pickle payload planted in any checkpoint file, even with a manifest forged to
match it, is refused and never runs, and the resume falls back in the same way."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import param_tensors, tiny_batch, tiny_matekd, tiny_tokenizer

from matekd_ds.checkpoint import MANIFEST, TRAINER, Checkpointer, CheckpointUnusable, crc32_of, tag_of


@pytest.fixture(scope="module")
def tokenizer_and_examples():
    return tiny_tokenizer()


def trained_with_checkpoints(tmp_path: Path, tokenizer_and_examples, stage: int = 2):
    """A tiny MATE-KD pair with checkpoints at steps 1 and 2 (keep 2); returns the method, the
    checkpointer and each checkpoint's student parameters."""
    tokenizer, examples = tokenizer_and_examples
    # bf16: at world size 1 the engines are DeepSpeed's BF16_Optimizer (the single-rank fast path),
    # which writes optimizer-state files beside the model states; fp32 runs as ZeRO-0, which has none
    method = tiny_matekd(stage, dtype="bf16")
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)
    batch = tiny_batch(tokenizer, examples)
    saved = {}
    for step in (1, 2):
        method.train_step([batch], step, [step])  # steps 1, 2 of a 1:1 cycle: student, generator
        checkpointer.save(method.engines, step, {"step": step})
        saved[step] = param_tensors(method.student.module)
    method.train_step([batch], 3, [3])  # moves on: a load must bring the weights back
    return method, checkpointer, saved


def assert_student_is(method, params) -> None:
    for name, value in param_tensors(method.student.module).items():
        assert torch.equal(value, params[name]), name


def test_a_verified_checkpoint_restores_the_engines(tmp_path, tokenizer_and_examples):
    method, checkpointer, saved = trained_with_checkpoints(tmp_path, tokenizer_and_examples)
    assert checkpointer.latest_tag() == tag_of(2)
    manifest = json.loads((tmp_path / "checkpoints" / TRAINER / tag_of(2) / MANIFEST).read_text())
    assert any(k.startswith("student/") for k in manifest["files"]) \
        and any(k.startswith("generator/") for k in manifest["files"])
    assert checkpointer.verify(["student", "generator"], tag_of(2)) is None
    assert checkpointer.load(method.engines) == {"step": 2}
    assert_student_is(method, saved[2])


def _newest(root: Path, pattern: str) -> Path:
    found = sorted((root / "checkpoints").glob(f"*/{tag_of(2)}/{pattern}"))
    assert found, pattern
    return found[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _unlisted_and_truncated(root: Path, pattern: str) -> None:
    """Damage the manifest cannot see: the file truncated and its entry removed."""
    victim = _newest(root, pattern)
    _truncate(victim)
    path = root / "checkpoints" / TRAINER / tag_of(2) / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"][str(victim.relative_to(root / "checkpoints"))]
    path.write_text(json.dumps(manifest))


DAMAGE = {
    "truncated model file": lambda root: _truncate(_newest(root, "mp_rank_00_model_states.pt")),
    "flipped byte in the optimizer states": lambda root: _flip_a_byte(_newest(root, "*optim_states.pt")),
    "bad state.json": lambda root: _newest(root, "state.json").write_text("{not json"),
    "empty RNG file": lambda root: _newest(root, "rng_rank0.pt").write_bytes(b""),
    "deleted engine folder": lambda root: __import__("shutil").rmtree(root / "checkpoints" / "generator" / tag_of(2)),
    "LATEST names a missing tag": lambda root: (root / "checkpoints" / "LATEST").write_text(tag_of(99)),
    "empty LATEST": lambda root: (root / "checkpoints" / "LATEST").write_text(""),
    "interrupted save (no manifest)": lambda root: (root / "checkpoints" / TRAINER / tag_of(2) / MANIFEST).unlink(),
    "truncated model file left out of the manifest":
        lambda root: _unlisted_and_truncated(root, "mp_rank_00_model_states.pt"),
    "truncated optimizer states left out of the manifest":
        lambda root: _unlisted_and_truncated(root, "*optim_states.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, tokenizer_and_examples, damage, caplog):
    method, checkpointer, saved = trained_with_checkpoints(tmp_path, tokenizer_and_examples)
    DAMAGE[damage](tmp_path)
    with caplog.at_level(logging.WARNING, logger="matekd"):
        state = checkpointer.load(method.engines)
    pointer_only = damage.startswith(("LATEST", "empty LATEST"))
    expected = 2 if pointer_only else 1  # LATEST is a pointer for people: the manifests decide
    assert state == {"step": expected}
    assert_student_is(method, saved[expected])
    if not pointer_only:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and tag_of(2) in warnings[0] and "skipped" in warnings[0]


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path, tokenizer_and_examples):
    method, checkpointer, _ = trained_with_checkpoints(tmp_path, tokenizer_and_examples)
    for step in (1, 2):
        _flip_a_byte(sorted((tmp_path / "checkpoints" / "student" / tag_of(step)).glob("*model_states.pt"))[0])
    with pytest.raises(CheckpointUnusable, match="could be used") as err:  # a failed run (exit 1), not bad input
        checkpointer.load(method.engines)
    assert "\n" not in str(err.value)


def test_a_phase_without_any_complete_checkpoint_starts_fresh(tmp_path, tokenizer_and_examples):
    tokenizer, _ = tokenizer_and_examples
    method = tiny_matekd(0)
    assert Checkpointer(tmp_path / "none", keep=2).load(method.engines) is None


class Payload:
    """Unpickling this runs a shell command (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _forge_manifest(root: Path, changed: Path) -> None:
    path = root / "checkpoints" / TRAINER / tag_of(2) / MANIFEST
    manifest = json.loads(path.read_text())
    rel = str(changed.relative_to(root / "checkpoints"))
    manifest["files"][rel] = {"size": changed.stat().st_size, "crc32": crc32_of(changed)}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "*optim_states.pt", "rng_rank0.pt"])
def test_a_planted_pickle_payload_never_runs(tmp_path, tokenizer_and_examples, target, caplog):
    method, checkpointer, saved = trained_with_checkpoints(tmp_path, tokenizer_and_examples)
    marker = tmp_path / "PWNED"
    victim = _newest(tmp_path, target)
    torch.save({"module": Payload(marker), "payload": Payload(marker)}, victim)
    _forge_manifest(tmp_path, victim)  # the attacker rewrote the manifest too: it verifies
    assert checkpointer.verify(["student", "generator"], tag_of(2)) is None
    with caplog.at_level(logging.WARNING, logger="matekd"):
        state = checkpointer.load(method.engines)
    assert not marker.exists(), "the planted payload ran"
    # refused like any checkpoint that fails to load: the previous one is used
    assert state == {"step": 1}
    assert_student_is(method, saved[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0] and victim.name in warnings[0], warnings
