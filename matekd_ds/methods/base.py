"""What a training method is to the loop (`Method`), and what methods share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


class Method(Protocol):
    """A training method (ft, kd, matekd, the generator's MLM warm-up), as the Trainer drives it.

    `engines`: the DeepSpeed engines it trains, by role ("student", "generator", "teacher");
    the Trainer checkpoints and restores each under that name. `trains(step)`: the role of the
    engine that step trains (MATE-KD alternates generator and student steps). `train_step`: one
    optimizer step over the step's micro-batches (forward, backward and step of that engine);
    `seeds` has one seed per micro-batch for the step's masks and noise. Returns the step's mean
    losses as 0-d tensors (read on the host only at logging steps). A method that keeps state
    outside its engines may also define `state_dict()` (plain values) and `load_state_dict(state)`:
    the Trainer checkpoints and restores it with the loop's own state."""

    name: str

    @property
    def engines(self) -> dict[str, Any]: ...

    def trains(self, step: int) -> str: ...

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int,
                   seeds: list[int]) -> dict[str, torch.Tensor]: ...


class SingleEngine:
    """Base for methods that train one engine alone: every step is a step of that engine."""

    def __init__(self, engine, role: str = "student"):
        self.engine = engine
        self.role = role  # "student", or "teacher" when this fine-tunes the teacher

    @property
    def engines(self) -> dict[str, Any]:
        return {self.role: self.engine}

    def trains(self, step: int) -> str:
        return self.role


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of `module` requires grad inside the block, so a backward through its
    activations leaves its .grad, its engine's gradient hooks and its ZeRO state untouched."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def autocast_to(dtype: torch.dtype | None, device_type: str) -> Iterator[None]:
    """Inside the block, eligible ops (matmuls) run in `dtype` (None: as they are): for the
    forwards of frozen models that need no gradient (train.frozen_forward_dtype)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield
