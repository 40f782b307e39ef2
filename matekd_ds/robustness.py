"""Robustness as an evaluation: a model (and its teacher) on clean text and on the same text
perturbed the MATE-KD way, side by side.

The perturbation: a fraction `mask_prob` of each example's real tokens is masked and a masked-LM
generator fills them in (Gumbel-softmax sample at temperature `tau`), with a fixed seed. The
examples are perturbed in fixed blocks of consecutive examples, block b with seeds derived from
(seed, b) alone, so every model, every rank count and every rerun sees the same perturbed text
(on the same kind of device: the GPU's sampling kernel draws a different noise stream).

Reported per data set: the task's metrics (and accuracy) of each model on clean and perturbed
text; with a teacher, the agreement (fraction of examples where both predict the same class) and
KL(teacher || model) of the output distributions, mean over examples (regression: the mean
squared difference of the predictions); the fraction of real tokens the generator changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from matekd_ds import distributed
from matekd_ds.data.batching import Encoded, collate, to_device
from matekd_ds.data.glue import TaskSpec
from matekd_ds.metrics import accuracy, predictions_from_outputs, task_metrics
from matekd_ds.perturb import Perturber

BLOCK = 128  # examples perturbed together; fixed, so the perturbation does not depend on the ranks
# (128 and the seeds of _block_seeds: the perturbation benchmarks/quality/student_agreement.py measured before)


@dataclass(frozen=True)
class Perturbation:
    generator: str  # what the generator is (a path, hub id, or "builtin:... (untrained)")
    mask_prob: float
    tau: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"generator": self.generator, "mask_prob": self.mask_prob, "tau": self.tau, "seed": self.seed}


def _block_seeds(seed: int, block: int) -> tuple[int, int]:
    """(masking seed, sampling seed) of one block."""
    return seed + 2 * block, seed + 2 * block + 1


@torch.no_grad()
def perturbed_copy(data: Encoded, generator: nn.Module, tokenizer, settings: Perturbation,
                   device: torch.device) -> Encoded:
    """`data` with the generator's rewrite of its masked tokens; the same on every rank. Blocks
    are shared out over the ranks and gathered."""
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, settings.mask_prob, settings.tau)
    was_training = generator.training
    generator.eval()
    blocks = range(distributed.rank(), -(-len(data) // BLOCK), distributed.world_size())
    local: list[tuple[int, list[int]]] = []
    for block in blocks:
        indices = list(range(block * BLOCK, min((block + 1) * BLOCK, len(data))))
        batch = to_device(collate(data, indices, tokenizer.pad_token_id), device)
        mask_seed, sample_seed = _block_seeds(settings.seed, block)
        ids = perturber.sample_perturbed_ids(generator, perturber.mask_batch(batch, mask_seed), sample_seed).cpu()
        local.extend((i, ids[row, : len(data.input_ids[i])].tolist()) for row, i in enumerate(indices))
    generator.train(was_training)
    by_index = dict(pair for part in distributed.gather_objects(local) for pair in part)
    return Encoded([by_index[i] for i in range(len(data))], data.token_type_ids, data.labels, data.regression)


def changed_token_fraction(clean: Encoded, perturbed: Encoded, special_ids: list[int]) -> float:
    """The fraction of real (non-special) tokens whose id the perturbation changed."""
    special = set(special_ids)
    real = changed = 0
    for a, b in zip(clean.input_ids, perturbed.input_ids):
        for x, y in zip(a, b):
            if x not in special:
                real += 1
                changed += x != y
    return changed / real if real else 0.0


def compare_to_teacher(outputs: np.ndarray, teacher: np.ndarray, regression: bool) -> dict[str, float]:
    """Classification: agreement of the argmax and KL(teacher || model) of the softmax, mean
    over examples; regression: the mean squared difference."""
    outputs, teacher = np.asarray(outputs, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    if regression:
        return {"mse_to_teacher": float(np.mean((outputs.reshape(-1) - teacher.reshape(-1)) ** 2))}
    log_p, log_q = _log_softmax(teacher), _log_softmax(outputs)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"agreement": float(np.mean(outputs.argmax(-1) == teacher.argmax(-1))), "kl": float(kl.mean())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def scores(spec: TaskSpec, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics, with accuracy always there for a classification task."""
    out = task_metrics(spec, outputs, labels)
    if not spec.is_regression:
        out.setdefault("accuracy", accuracy(predictions_from_outputs(spec, outputs), labels))
    return out


def side_by_side(spec: TaskSpec, labels: np.ndarray, model: dict[str, np.ndarray],
                 teacher: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """{"clean": {...}, "perturbed": {...}}: each with "model" (and "teacher") metrics and, with a
    teacher, agreement and KL to it. `model`/`teacher`: {"clean": outputs, "perturbed": outputs}."""
    report: dict[str, Any] = {}
    for text in ("clean", "perturbed"):
        row: dict[str, Any] = {"model": scores(spec, model[text], labels)}
        if teacher is not None:
            row["teacher"] = scores(spec, teacher[text], labels)
            row.update(compare_to_teacher(model[text], teacher[text], spec.is_regression))
        report[text] = row
    return report
