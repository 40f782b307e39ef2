"""Masked-LM warm-up of the generator on the task's own text, before MATE-KD starts.

A generator built from an encoder checkpoint has an MLM head whose decoder is tied to the word
embeddings but whose transform is freshly initialised: its first samples are noise. A short
MLM run on the training text (masked the way MATE-KD masks: `mask_prob`, every chosen token
replaced by the mask token) makes its proposals plausible words before the min-max game."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matekd_ds.data.batching import Encoded, collate
from matekd_ds.perturb import Perturber


def mlm_loss(generator: torch.nn.Module, perturber: Perturber, batch: dict[str, torch.Tensor],
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the generator's prediction at the masked rows; also returns the number
    of masked rows and how many it predicts right."""
    mb = perturber.mask_batch(batch, seed)
    logits = perturber.masked_logits(generator, mb).float()
    targets = mb.input_ids[mb.mask]
    loss = F.cross_entropy(logits, targets)
    return loss, targets.numel(), (logits.argmax(-1) == targets).sum()


class MlmWarmup:
    name = "mlm"

    def __init__(self, generator_engine, perturber: Perturber):
        self.generator = generator_engine
        self.perturber = perturber

    @property
    def engines(self) -> dict:
        return {"generator": self.generator}

    def trains(self, step: int) -> str:
        return "generator"

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int,
                   seeds: list[int]) -> dict[str, torch.Tensor]:
        loss_sum, right, rows = 0.0, 0, 0
        for batch, seed in zip(micro_batches, seeds):
            # The bare module, as in MATE-KD's generator step: the engine only sees the backward.
            loss, masked, correct = mlm_loss(self.generator.module, self.perturber, batch, seed)
            self.generator.backward(loss)
            self.generator.step()
            loss_sum, right, rows = loss_sum + loss.detach(), right + correct, rows + masked
        return {"mlm_loss": loss_sum / len(micro_batches), "mlm_accuracy": right.float() / max(rows, 1)}


@torch.no_grad()
def mlm_evaluate(generator: torch.nn.Module, perturber: Perturber, data: Encoded, batch_size: int,
                 pad_id: int, device: torch.device, seed: int = 0) -> dict[str, float]:
    """Masked-token accuracy and loss on `data` with fixed masks (the same on every call and
    rank, so the numbers are comparable across the warm-up)."""
    was_training = generator.training
    generator.eval()
    loss_sum, right, rows = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in collate(data, indices, pad_id).items()}
        loss, masked, correct = mlm_loss(generator, perturber, batch, seed + start)
        loss_sum, right, rows = loss_sum + float(loss) * masked, right + int(correct), rows + masked
    generator.train(was_training)
    accuracy = right / max(rows, 1)
    return {"accuracy": accuracy, "loss": loss_sum / max(rows, 1), "main": accuracy}


class MlmEvaluator:
    """What the warm-up's loop calls to score the generator: masked-token accuracy on dev text."""

    metric_name = "mlm_accuracy"

    def __init__(self, generator: torch.nn.Module, perturber: Perturber, dev: Encoded, batch_size: int, pad_id: int,
                 device: torch.device):
        self.generator, self.perturber, self.dev = generator, perturber, dev
        self.batch_size, self.pad_id, self.device = batch_size, pad_id, device

    def __call__(self) -> dict[str, dict[str, float]]:
        return {"dev": mlm_evaluate(self.generator, self.perturber, self.dev, self.batch_size, self.pad_id,
                                    self.device)}
