"""An eager PyTorch reference of MATE-KD, formulated the way the official code does it.

The official implementation (Rashid et al., ACL 2021; huawei-noah/Efficient-NLP, MATE-KD) runs,
for EVERY batch of a cycle:

  generator(masked ids)            -> logits on all B x L positions (the MLM head everywhere)
  gumbel_softmax(logits, tau)      -> straight-through one-hot y, B x L x V (noise drawn B x L x V)
  inputs_embeds(model)             =  (y @ E_model) * mask + E_model[ids] * (1 - mask)
                                      (a B*L x V by V x H product for teacher and for student)
  div = soft CE(student(inputs_embeds), teacher(inputs_embeds))

then either (generator step)  loss = -div, backward, clip 5, AdamW step of the generator;
or          (student step)    loss = 1/3 CE(student(x)) + 1/3 div + 1/3 soft CE(student(x), teacher(x)),
                              backward -- through the student, the teacher and the generator,
                              since nothing is detached -- clip 5, step of the student only.
The generator's gradients from student steps are simply discarded (zero_grad before its next
step); the student's gradients from generator steps likewise.

This module is two things:
* the baseline of benchmarks/bench_train.py (what the project's MATE-KD step is measured against);
* a correctness oracle (tests/test_reference_oracle.py): `Perturbation` lets a caller force the
  mask and the Gumbel noise, so that the reference and the project draw the same perturbation
  and must then produce the same losses, gradients and updates.

Deliberate choices, shared with the project so that the comparison is on identical work:
* torch.optim.AdamW for both models, no decay on biases and LayerNorm weights (the official
  student uses Adam + L2 decay; the project and this reference use AdamW).
* The teacher is frozen (requires_grad False): activations still carry gradient through it.
* Classification only (no STS-B regression); T = 1 by default; the learning rate is constant.
* Module train/eval modes are left as the caller set them (tests need dropout off).
* With `amp_dtype` set, the forward runs under torch.autocast on fp32 weights (eager AMP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GUMBEL_EPS = 1e-20  # the official sample_gumbel's eps: -log(-log(U + eps) + eps)
NO_DECAY = ("bias", "LayerNorm.weight")  # the official grouping (HF run_glue)


@dataclass
class Perturbation:
    """What the generator rewrites and with which noise.

    mask: [B, L] bool, the positions replaced by generator samples.
    gumbel_noise: [B, L, V] float32 G; rows outside the mask do not matter (multiplied by 0).
    """

    mask: torch.Tensor
    gumbel_noise: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The pieces, as the official code computes them


def choose_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int],
                prob: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(prob) on every attended non-special token (the official mask_tokens)."""
    special = torch.tensor(sorted(set(special_ids)), device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    probability = torch.full(input_ids.shape, float(prob)) * candidates.cpu()
    return torch.bernoulli(probability, generator=generator).bool().to(input_ids.device)


def gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.rand(shape, device=device, generator=generator)
    return -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)


def gumbel_softmax_straight_through(logits: torch.Tensor, noise: torch.Tensor,
                                    tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, index): y is the one-hot of argmax(log_softmax(logits) + G) in value and has the
    gradient of softmax((...) / tau), on every position: the B x L x V noise, log_softmax,
    softmax and one-hot are all materialised."""
    soft = F.softmax((F.log_softmax(logits.float(), dim=-1) + noise) / tau, dim=-1)
    index = soft.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return (hard - soft).detach() + soft, index.squeeze(-1)


def mixed_inputs_embeds(model: nn.Module, one_hot: torch.Tensor, input_ids: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """(y @ E) at masked positions, E[ids] elsewhere; y @ E is computed for all B x L rows."""
    embedding = model.get_input_embeddings()
    keep = mask.unsqueeze(-1).to(one_hot.dtype)
    generated = torch.matmul(one_hot, embedding.weight) * keep
    return generated + embedding(input_ids) * (1 - keep)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum softmax(t / T) * log_softmax(s / T), averaged over rows."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(dim=-1).mean()


def grouped_parameters(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cycle_role(step: int, generator_steps: int, student_steps: int) -> str:
    return "generator" if step % (generator_steps + student_steps) < generator_steps else "student"


# ---------------------------------------------------------------------------------------------
# The method


class ReferenceMateKD:
    """One generator step and one student step of MATE-KD, eagerly, as the official code."""

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: nn.Module, *,
                 mask_token_id: int, special_ids: Iterable[int], mask_prob: float = 0.3,
                 tau: float = 1.0, temperature: float = 1.0,
                 loss_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
                 student_lr: float = 2e-5, generator_lr: float = 5e-7, weight_decay: float = 0.0,
                 clip: float = 5.0, generator_clip: float = 5.0,
                 generator_steps: int = 10, student_steps: int = 100,
                 amp_dtype: torch.dtype | None = None):
        self.teacher, self.student, self.generator = teacher, student, generator
        self.teacher.requires_grad_(False)
        self.mask_token_id, self.special_ids = mask_token_id, sorted(set(special_ids))
        self.mask_prob, self.tau, self.temperature = mask_prob, tau, temperature
        self.weights = loss_weights
        self.clip, self.generator_clip = clip, generator_clip
        self.generator_steps, self.student_steps = generator_steps, student_steps
        self.amp_dtype = amp_dtype
        self.device = next(student.parameters()).device
        self.student_optimizer = torch.optim.AdamW(grouped_parameters(student, weight_decay), lr=student_lr)
        self.generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=generator_lr, weight_decay=0.0)
        # Instrumentation points for the benchmark and the tests (no-ops by default):
        # section(name) wraps "backward" and "optimizer"; after_backward(role) sees the gradients.
        self.section: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
        self.after_backward: Callable[[str], None] = lambda role: None

    # -- driving -------------------------------------------------------------------------------

    def trains(self, step: int) -> str:
        return cycle_role(step, self.generator_steps, self.student_steps)

    def train_step(self, batch: dict[str, torch.Tensor], step: int, seed: int) -> dict[str, torch.Tensor]:
        if self.trains(step) == "generator":
            return self.generator_step(batch, seed)
        return self.student_step(batch, seed)

    def draw_perturbation(self, batch: dict[str, torch.Tensor], seed: int) -> Perturbation:
        ids = batch["input_ids"]
        mask = choose_mask(ids, batch["attention_mask"], self.special_ids, self.mask_prob,
                           torch.Generator().manual_seed(seed))
        vocab = self.generator.get_output_embeddings().weight.shape[0]
        noise_rng = torch.Generator(device=self.device).manual_seed(seed + 1)
        return Perturbation(mask, gumbel_noise((*ids.shape, vocab), self.device, noise_rng))

    # -- the two steps ---------------------------------------------------------------------------

    def generator_step(self, batch: dict[str, torch.Tensor], seed: int | None = None,
                       perturbation: Perturbation | None = None) -> dict[str, torch.Tensor]:
        perturbation = perturbation or self.draw_perturbation(batch, seed)
        with self._precision():
            one_hot, sampled = self._generate(batch, perturbation)
            teacher_logits, student_logits = self._perturbed_logits(batch, perturbation.mask, one_hot)
            adversarial = soft_cross_entropy(student_logits, teacher_logits, self.temperature)
        # The student is not frozen (as in the official code): its gradients are computed here and
        # thrown away by the zero_grad of the next student step.
        self._update("generator", -adversarial, self.generator, self.generator_optimizer, self.generator_clip)
        return {"gen_div": adversarial.detach(), "masked_tokens": perturbation.mask.sum().float(),
                "perturbed_ids": torch.where(perturbation.mask, sampled, batch["input_ids"])}

    def student_step(self, batch: dict[str, torch.Tensor], seed: int | None = None,
                     perturbation: Perturbation | None = None) -> dict[str, torch.Tensor]:
        perturbation = perturbation or self.draw_perturbation(batch, seed)
        with self._precision():
            one_hot, sampled = self._generate(batch, perturbation)  # attached to the generator's graph
            teacher_perturbed, student_perturbed = self._perturbed_logits(batch, perturbation.mask, one_hot)
            div_perturbed = soft_cross_entropy(student_perturbed, teacher_perturbed, self.temperature)
            teacher_clean = self.teacher(**self._model_inputs(batch)).logits
            student_clean = self.student(**self._model_inputs(batch)).logits
            div_clean = soft_cross_entropy(student_clean, teacher_clean, self.temperature)
            ce = F.cross_entropy(student_clean.float(), batch["labels"])
            w_ce, w_clean, w_perturbed = self.weights
            loss = w_ce * ce + w_perturbed * div_perturbed + w_clean * div_clean
        self._update("student", loss, self.student, self.student_optimizer, self.clip)
        return {"loss": loss.detach(), "ce": ce.detach(), "div_clean": div_clean.detach(),
                "div_perturbed": div_perturbed.detach(),
                "perturbed_ids": torch.where(perturbation.mask, sampled, batch["input_ids"])}

    # -- helpers ---------------------------------------------------------------------------------

    def _precision(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @staticmethod
    def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def _generate(self, batch: dict[str, torch.Tensor],
                  perturbation: Perturbation) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's straight-through one-hot on every position [B, L, V], and its argmax."""
        inputs = self._model_inputs(batch)
        inputs["input_ids"] = batch["input_ids"].masked_fill(perturbation.mask, self.mask_token_id)
        logits = self.generator(**inputs).logits  # the MLM head on all B x L positions
        return gumbel_softmax_straight_through(logits, perturbation.gumbel_noise, self.tau)

    def _perturbed_logits(self, batch, mask, one_hot) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student on the perturbed text, each through its own one-hot @ E."""
        kwargs = {k: v for k, v in self._model_inputs(batch).items() if k != "input_ids"}
        ids = batch["input_ids"]
        teacher = self.teacher(inputs_embeds=mixed_inputs_embeds(self.teacher, one_hot, ids, mask), **kwargs).logits
        student = self.student(inputs_embeds=mixed_inputs_embeds(self.student, one_hot, ids, mask), **kwargs).logits
        return teacher, student

    def _update(self, role: str, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                clip: float) -> None:
        optimizer.zero_grad()
        with self.section("backward"):
            loss.backward()
        self.after_backward(role)
        with self.section("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
