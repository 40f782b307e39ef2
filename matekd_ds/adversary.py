"""The adversary probe (matekd.adversary_probe): does MATE-KD's generator become an adversary,
or do its samples stay masked-LM noise? After every generator phase (right after the last
generator step of a cycle) it measures, on a fixed probe set:

  div_trained         mean teacher-student divergence on text perturbed by the generator as
                      trained so far
  div_warm            the same on text perturbed by a frozen copy of the generator as the
                      student phase got it (after any MLM warm-up and generator_layers cut)
  weight_change       ‖W − W0‖ / ‖W0‖ over all the generator's parameters together
  weight_change_max   the largest per-tensor ‖W − W0‖ / ‖W0‖ (over the tensors with W0 ≠ 0: a
                      bias that starts at zero has no relative change)

The probe set is chosen once: this rank's first `adversary_probe_batches` training micro-batches,
each with its own fixed seed, so both generators see the same masks and Gumbel noise in every
phase and the phases are comparable. No gradient; the student and both generators run in eval
mode (no dropout) and are put back in the mode they were in. The weights measured are the
generator module's, the ones that sample (in a bf16 run the bf16 copy, not the fp32 master).
The generator must be whole on each rank (below ZeRO-3): the warm copy is a plain module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from matekd_ds import distributed
from matekd_ds.config import RunConfig
from matekd_ds.data.batching import Encoded, TrainStream, collate, model_inputs, to_device
from matekd_ds.methods.base import autocast_to
from matekd_ds.perturb import Perturber
from matekd_ds.teacher import Teacher
from matekd_ds.trainer import micro_seeds

PROBE_KEYS = ("div_trained", "div_warm", "weight_change", "weight_change_max")
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student logits, teacher logits) -> mean


def frozen_copy(generator: nn.Module) -> nn.Module:
    """The generator as it is now, frozen and in eval mode (taken before its engine trains it)."""
    warm = copy.deepcopy(generator)
    warm.requires_grad_(False)
    return warm.eval()


def weight_change(trained: nn.Module, start: nn.Module) -> tuple[float, float]:
    """‖W − W0‖ / ‖W0‖ over all parameters together, and the largest per-tensor ratio."""
    return tensors_change(dict(trained.named_parameters()), dict(start.named_parameters()))


def tensors_change(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> tuple[float, float]:
    """weight_change on name -> tensor maps (`start`'s names), e.g. a checkpoint's state dict."""
    pairs = [(trained[name].detach().double(), w0.detach().double()) for name, w0 in start.items()]
    moved = torch.stack([(w - w0).pow(2).sum() for w, w0 in pairs]).cpu()
    size = torch.stack([w0.pow(2).sum() for _, w0 in pairs]).cpu()
    total = float((moved.sum() / size.sum()).sqrt()) if size.sum() > 0 else 0.0
    nonzero = size > 0
    per_tensor = (moved[nonzero] / size[nonzero]).sqrt()
    return total, float(per_tensor.max()) if per_tensor.numel() else 0.0


class AdversaryProbe:
    def __init__(self, warm: nn.Module, batches: list[dict[str, torch.Tensor]], seeds: list[int],
                 perturber: Perturber, teacher: Teacher, divergence: Divergence,
                 frozen_dtype: torch.dtype | None = None):
        self.warm = warm  # frozen, eval mode, on the trained generator's device and dtype
        self.batches, self.seeds = batches, seeds  # on the CPU; one seed per batch
        self.perturber, self.teacher, self.divergence = perturber, teacher, divergence
        self.frozen_dtype = frozen_dtype  # as in the student step: the no-grad forwards' autocast
        self.records: list[dict[str, float]] = []  # one per generator phase: metrics.json "adversary"

    @classmethod
    def for_run(cls, cfg: RunConfig, train: Encoded, pad_id: int, warm: nn.Module, trained: nn.Module,
                perturber: Perturber, teacher: Teacher, divergence: Divergence,
                frozen_dtype: torch.dtype | None) -> AdversaryProbe:
        """The run's probe: `warm` (frozen_copy of the generator before its engine was built) put
        where the engine put `trained`, and this rank's first training micro-batches."""
        reference = next(trained.parameters())
        warm.to(device=reference.device, dtype=reference.dtype)
        rank, world = distributed.rank(), distributed.world_size()
        stream = TrainStream.over(train, cfg.train.micro_batch_size, rank, world, cfg.train.seed,
                                  group_by_length=cfg.data.group_by_length).batches()
        n = cfg.matekd.adversary_probe_batches
        batches = [collate(train, next(stream), pad_id) for _ in range(n)]
        seeds = [micro_seeds(cfg.train.seed, "adversary_probe", i, rank, 1)[0] for i in range(n)]
        return cls(warm, batches, seeds, perturber, teacher, divergence, frozen_dtype)

    def measure(self, step: int, student: nn.Module, generator: nn.Module,
                device: torch.device) -> dict[str, torch.Tensor]:
        """Record the probe's values after `step` steps (the mean over ranks; collective: every
        rank calls it at the same step) and return them as `adversary_<key>` scalars."""
        modules = (student, generator, self.warm)
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            trained, warm = self._divergences(student, generator, device)
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
        values = distributed.mean_over_ranks([trained, warm, *weight_change(generator, self.warm)])
        self.records.append({"step": step, **dict(zip(PROBE_KEYS, values))})
        return {f"adversary_{key}": torch.tensor(value) for key, value in zip(PROBE_KEYS, values)}

    @torch.no_grad()
    def _divergences(self, student: nn.Module, generator: nn.Module, device: torch.device) -> tuple[float, float]:
        """Mean divergence over the probe set on the trained and on the warm generator's samples."""
        sums = {"trained": 0.0, "warm": 0.0}
        for cpu_batch, seed in zip(self.batches, self.seeds):
            batch = to_device(cpu_batch, device)
            mb = self.perturber.mask_batch(batch, seed)
            for name, sampler in (("trained", generator), ("warm", self.warm)):
                with autocast_to(self.frozen_dtype, device.type):
                    ids = self.perturber.sample_perturbed_ids(sampler, mb, seed + 1)
                    teacher_logits = self.teacher.logits(**dict(model_inputs(batch), input_ids=ids))
                student_logits = student(**dict(model_inputs(batch), input_ids=ids)).logits
                sums[name] += float(self.divergence(student_logits.float(), teacher_logits.float()))
        return sums["trained"] / len(self.batches), sums["warm"] / len(self.batches)
