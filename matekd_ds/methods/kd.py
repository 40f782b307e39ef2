"""Hinton KD: alpha·CE(labels) + (1 − alpha)·T²·divergence(student, teacher) on clean text."""

from __future__ import annotations

import torch

from matekd_ds.data.batching import model_inputs
from matekd_ds.losses import divergence, task_loss
from matekd_ds.methods.base import SingleEngine, autocast_to
from matekd_ds.teacher import Teacher


class KnowledgeDistillation(SingleEngine):
    name = "kd"

    def __init__(self, student_engine, teacher: Teacher, regression: bool, alpha: float, temperature: float,
                 frozen_dtype: torch.dtype | None = None):
        super().__init__(student_engine)
        self.teacher = teacher
        self.regression, self.alpha, self.temperature = regression, alpha, temperature
        self.frozen_dtype = frozen_dtype  # the teacher's forward (when not cached) under autocast

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int,
                   seeds: list[int]) -> dict[str, torch.Tensor]:
        sums = {"loss": 0.0, "ce": 0.0, "div": 0.0}
        T = self.temperature
        for batch in micro_batches:
            with autocast_to(self.frozen_dtype, batch["input_ids"].device.type):
                teacher_logits = self.teacher.clean_logits(batch)
            if self.frozen_dtype is not None:
                teacher_logits = teacher_logits.float()
            logits = self.engine(**model_inputs(batch)).logits
            ce = task_loss(logits, batch["labels"], self.regression)
            div = divergence(logits, teacher_logits, T, self.regression)
            loss = self.alpha * ce + (1 - self.alpha) * T * T * div
            self.engine.backward(loss)
            self.engine.step()
            for key, value in (("loss", loss), ("ce", ce), ("div", div)):
                sums[key] = sums[key] + value.detach()
        return {k: v / len(micro_batches) for k, v in sums.items()}
