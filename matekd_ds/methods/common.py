"""Small pieces the methods share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def doubled(batch: dict[str, torch.Tensor], perturbed_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clean and perturbed copies of a batch stacked into one forward of 2B rows."""
    out = {k: torch.cat([v, v]) for k, v in model_inputs(batch).items()}
    out["input_ids"] = torch.cat([batch["input_ids"], perturbed_ids])
    return out


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


class CleanTeacher:
    """The teacher's logits on clean training text. The teacher is frozen and in eval mode, so
    these never change: with a precomputed table (one sharded pass over the training set) a
    lookup by example index replaces the teacher forward on clean text in every step."""

    def __init__(self, teacher: nn.Module, table: torch.Tensor | None = None, engine=None):
        self.teacher = teacher
        self.table = table  # [N, C] on the device, or None to run the teacher each step
        self.engine = engine  # the teacher's ZeRO-3 inference engine (deepspeed.teacher), or None

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.table is not None:
            return self.table[batch["index"]]
        return self.teacher(**model_inputs(batch)).logits


class StudentOnly:
    """Base for methods that train the student engine alone: every step is a student step."""

    student = None  # the student's DeepSpeed engine

    @property
    def engines(self) -> dict:
        return {"student": self.student}

    def phase(self, step: int) -> str:
        return "student"
