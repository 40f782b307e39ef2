"""Dev-set evaluation, sharded over ranks and gathered without duplicates or drops, and the
evaluator a training loop calls."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from matekd_ds import distributed
from matekd_ds.data.batching import Encoded, collate, eval_shard, model_inputs, to_device
from matekd_ds.data.glue import TaskSpec
from matekd_ds.metrics import task_metrics


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int, pad_id: int, device: torch.device) -> np.ndarray:
    """Outputs for every example of `data`, in order, on every rank."""
    was_training = model.training
    model.eval()
    shard = eval_shard(len(data), distributed.rank(), distributed.world_size())
    local: list[tuple[int, np.ndarray]] = []
    for start in range(0, len(shard), batch_size):
        indices = shard[start: start + batch_size]
        batch = to_device(collate(data, indices, pad_id), device)
        logits = model(**model_inputs(batch)).logits.float().cpu().numpy()
        local.extend(zip(indices, logits))
    model.train(was_training)
    by_index: dict[int, np.ndarray] = {}
    for part in distributed.gather_objects(local):
        for index, row in part:
            by_index.setdefault(index, row)  # padding repeats an index: keep one copy
    assert len(by_index) == len(data), f"evaluation gathered {len(by_index)} of {len(data)} examples"
    return np.stack([by_index[i] for i in range(len(data))])


def evaluate(model: nn.Module, dev: dict[str, Encoded], spec: TaskSpec, batch_size: int, pad_id: int,
             device: torch.device) -> dict[str, dict[str, float]]:
    """{split: {metric: value, ..., "main": value}} for each dev split."""
    results = {}
    for split, data in dev.items():
        outputs = predict(model, data, batch_size, pad_id, device)
        results[split] = task_metrics(spec, outputs, np.asarray(data.labels))
    return results


def main_score(results: dict[str, dict[str, float]]) -> float:
    """The selection metric: the main metric of the first dev split (MNLI: matched)."""
    return next(iter(results.values()))["main"]


class DevEvaluator:
    """What a training loop calls to score its model: the task's metrics on every dev split."""

    def __init__(self, model: nn.Module, dev: dict[str, Encoded], spec: TaskSpec, batch_size: int, pad_id: int,
                 device: torch.device):
        self.model, self.dev, self.spec = model, dev, spec
        self.batch_size, self.pad_id, self.device = batch_size, pad_id, device
        self.metric_name = spec.main_metric

    def __call__(self) -> dict[str, dict[str, float]]:
        return evaluate(self.model, self.dev, self.spec, self.batch_size, self.pad_id, self.device)
