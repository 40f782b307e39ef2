"""Fine-tuning on labels only: the student baseline, and how teachers are trained."""

from __future__ import annotations

import torch

from matekd_ds.data.batching import model_inputs
from matekd_ds.losses import task_loss
from matekd_ds.methods.base import SingleEngine


class FineTune(SingleEngine):
    name = "ft"

    def __init__(self, engine, regression: bool, role: str = "student"):
        super().__init__(engine, role)
        self.regression = regression

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int,
                   seeds: list[int]) -> dict[str, torch.Tensor]:
        total = 0.0
        for batch in micro_batches:
            logits = self.engine(**model_inputs(batch)).logits
            loss = task_loss(logits, batch["labels"], self.regression)
            self.engine.backward(loss)
            self.engine.step()
            total = total + loss.detach()
        return {"loss": total / len(micro_batches)}
