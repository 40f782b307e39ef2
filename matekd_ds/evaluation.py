"""Dev-set evaluation, sharded over ranks and gathered without duplicates or drops, and the
evaluator a training loop calls."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from torch import nn

from matekd_ds import distributed
from matekd_ds.data.batching import Encoded, collate, eval_shard, model_inputs, to_device
from matekd_ds.data.glue import TaskSpec
from matekd_ds.metrics import task_metrics

# `matekd eval` and `matekd predict` score whole files (QNLI's dev set: 5463 rows, 43 s on 2 CPU
# cores): a progress bar on stderr says how far they are. Drawn on a terminal; in a log file only
# for long inputs, with a line every 30 s. Training's own evaluations draw none (its log says).
LONG_INPUT = 2000  # examples on this rank
_bars: dict[str, str | None] = {"label": None}


@contextlib.contextmanager
def progress_bars(label: str):
    """Within it, predict() shows its progress on stderr (rank 0), as `label`."""
    previous, _bars["label"] = _bars["label"], label
    try:
        yield
    finally:
        _bars["label"] = previous


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def _progress_bar(examples: int):
    """A tqdm bar over `examples`, or None: outside progress_bars(), off rank 0, or a short
    input on a stderr that is not a terminal."""
    label = _bars["label"]
    if label is None or not distributed.is_main():
        return None
    terminal = _stderr_is_terminal()
    if not terminal and examples < LONG_INPUT:
        return None
    from tqdm import tqdm

    return tqdm(total=examples, desc=label, unit="ex", file=sys.stderr, leave=not terminal, dynamic_ncols=True,
                mininterval=0.5 if terminal else 30.0)


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int, pad_id: int, device: torch.device) -> np.ndarray:
    """Outputs for every example of `data`, in order, on every rank."""
    was_training = model.training
    model.eval()
    shard = eval_shard(len(data), distributed.rank(), distributed.world_size())
    local: list[tuple[int, np.ndarray]] = []
    bar = _progress_bar(len(shard))
    for start in range(0, len(shard), batch_size):
        indices = shard[start: start + batch_size]
        batch = to_device(collate(data, indices, pad_id), device)
        logits = model(**model_inputs(batch)).logits.float().cpu().numpy()
        local.extend(zip(indices, logits))
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
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
