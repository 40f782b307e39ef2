"""The losses of the three methods. Divergences go through matekd_ds.kernels (Triton on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matekd_ds.kernels import soft_cross_entropy


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """CE on labels; MSE for regression (one output)."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               regression: bool) -> torch.Tensor:
    """The official code's divergence: soft cross-entropy −Σ softmax(t/T)·log_softmax(s/T),
    averaged over rows; MSE between logits for regression. Gradients reach both inputs."""
    if regression:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return soft_cross_entropy(student_logits, teacher_logits, temperature=temperature, reduction="mean")
