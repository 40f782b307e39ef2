"""Every DeepSpeed engine of a run, built in one place from the run config.

`RunEngines` is to a MATE-KD run what DeepSpeed-Chat's `DeepSpeedRLHFEngine` is to RLHF: one
method per engine (teacher fine-tuning, the generator's MLM warm-up, the student, the generator,
the frozen teacher), each taking its DeepSpeed config, learning rate, schedule and step budget
from the run config. The building blocks below it (optimizer, schedules, `build_engine`) carry
no run knowledge. DeepSpeed config resolution is ds_config.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from matekd_ds import distributed
from matekd_ds.config import RunConfig
from matekd_ds.ds_config import fill_model_autos
from matekd_ds.methods.matekd import count_student_steps, steps_holding_student_steps
from matekd_ds.teacher import Teacher

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Optimizers and schedules


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apex_fused_adam():
    """NVIDIA apex's FusedAdam when apex is installed (it is not on PyPI; detected at run time)."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:  # absent, or built without its CUDA extensions
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, on_cuda: bool) -> torch.optim.Optimizer:
    groups = _param_groups(model, weight_decay)
    fused_adam = apex_fused_adam() if on_cuda else None
    if fused_adam is not None:
        return fused_adam(groups, lr=lr, adam_w_mode=True)
    # fused AdamW: one kernel over all parameters, on CUDA and on the CPU alike (3-4x the step speed).
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def linear_schedule(total_steps: int, warmup_steps: int):
    """Linear warm-up then linear decay to 0 (the official code's student schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def constant_schedule(step: int) -> float:
    return 1.0


def steps_from_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))


# ---------------------------------------------------------------------------------------------
# Engines


@dataclass
class EngineSpec:
    role: str
    ds_config: dict[str, Any]  # finalized
    lr: float
    weight_decay: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "linear"  # or "constant"
    single_rank_fast_path: bool = True  # deepspeed.single_rank_fast_path (below)


def build_engine(model: nn.Module, spec: EngineSpec):
    """A trained model's DeepSpeed engine: its optimizer (AdamW, or apex FusedAdam on CUDA when
    installed), its learning-rate schedule, its ZeRO stage and precision. At world size 1 it
    takes the single-rank fast path (below) when the spec allows and DeepSpeed supports it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    optimizer = build_optimizer(model, spec.lr, spec.weight_decay, on_cuda)
    factor = linear_schedule(spec.total_steps, spec.warmup_steps) if spec.schedule == "linear" else constant_schedule

    def scheduler(opt):  # DeepSpeed hands it the optimizer it actually steps (the ZeRO-wrapped one's base)
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    ds_config = fill_model_autos(spec.ds_config, model)
    single_rank = spec.single_rank_fast_path and distributed.world_size() == 1 and fast_path_supported()
    if single_rank:
        ds_config = single_rank_ds_config(ds_config)
    if apex_fused_adam() is not None and on_cuda:
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    if single_rank and engine.zero_optimization_stage() == 0:
        skip_single_rank_allreduce(engine)
        if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
            keep_gradient_norm(engine)
    return engine


# ---------------------------------------------------------------------------------------------
# The single-rank fast path: at world size 1 there is nothing to reduce or partition.
#
# It replaces three private members of DeepSpeed's engine (allreduce_gradients,
# clip_fp32_gradients, _global_grad_norm), so it is used only on the DeepSpeed releases it was
# verified against (tests/test_single_rank.py checks that the engine still calls them where this
# code expects, and that the update equals DeepSpeed's own). Outside the range every engine
# takes DeepSpeed's own path: correct, about 4% slower per step on the CPU benchmark.

FAST_PATH_DEEPSPEED = ((0, 19), (0, 20))  # [first verified minor release, first unverified one)
FAST_PATH_MEMBERS = ("allreduce_gradients", "clip_fp32_gradients", "is_gradient_accumulation_boundary",
                     "gradient_clipping")


def deepspeed_release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.19.8" or "1.2rc1"; (0, 0) if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def fast_path_supported() -> bool:
    """Whether the installed DeepSpeed is in the verified range and has the members replaced."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    first, beyond = FAST_PATH_DEEPSPEED
    in_range = first <= deepspeed_release(deepspeed.__version__) < beyond
    return in_range and all(hasattr(DeepSpeedEngine, name) for name in FAST_PATH_MEMBERS)


def single_rank_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-1/2 at world size 1 without offload, as the cheapest engine that makes their update.

    One rank's partition is the whole model, yet ZeRO-1/2 copy every gradient through their
    reduction buckets into a flat fp32 partition and every updated weight back, and in bf16 check
    every gradient tensor for overflow one by one (a bf16 step costs 26 ms of launches on an H200
    where the update itself is 4 ms: benchmarks/bench_optimizer.py).
    - fp32: ZeRO-0 makes the same update (tests/test_single_rank.py).
    - bf16: DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation): fp32 master
      weights and fp32 gradients as ZeRO-1/2 keep them, one flat fused update. The same update,
      bit for bit, on the CPU with accumulation and active clipping (tests/test_single_rank.py);
      on an H200, 12 steps at gpu-base ended 5% of their movement apart, the losses equal to 3
      decimals (bench_optimizer.py's drift; the cause is not pinned down).
    - fp16 keeps its stage: ZeRO-0 fp16 is a different loss-scaling wrapper."""
    zero = ds_config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if zero.get("stage", 0) not in (1, 2) or offload or ds_config.get("fp16", {}).get("enabled"):
        return ds_config
    if not ds_config.get("bf16", {}).get("enabled"):
        return {**ds_config, "zero_optimization": {"stage": 0}}
    data_types = ds_config.get("data_types", {})
    if data_types.get("grad_accum_dtype", "fp32") != "fp32":  # asked for bf16 accumulation: DeepSpeed's ZeRO
        return ds_config
    return {**ds_config, "zero_optimization": {"stage": 1}, "data_types": {**data_types, "grad_accum_dtype": "fp32"}}


def single_rank_bf16_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether single_rank_ds_config builds this config as DeepSpeed's BF16_Optimizer (its
    checkpoints are not ZeRO-1/2's: inputs.checkpoint_layout records it)."""
    return single_rank_ds_config(ds_config) is not ds_config and bool(ds_config.get("bf16", {}).get("enabled"))


def skip_single_rank_allreduce(engine) -> None:
    """A ZeRO-0 engine reduces gradients after each backward at an accumulation boundary: it
    flattens them into buffers, all-reduces over the one rank, divides by 1 and copies them back,
    two passes over every gradient per step. At world size 1 all that changes is that a trained
    parameter without a gradient gets a zero one, so AdamW still applies its momentum and weight
    decay: do only that. Clipping, loss scaling and accumulation live in backward/step, untouched."""
    def fill_missing_gradients(*args, **kwargs) -> None:
        boundary = engine.is_gradient_accumulation_boundary()
        if hasattr(engine.optimizer, "set_gradient_accumulation_boundary"):
            engine.optimizer.set_gradient_accumulation_boundary(boundary)
        if boundary:
            for param in engine.module.parameters():
                if param.requires_grad and param.grad is None and param.numel():
                    param.grad = torch.zeros_like(param)

    engine.allreduce_gradients = fill_missing_gradients


def keep_gradient_norm(engine) -> None:
    """An fp32 ZeRO-0 engine clips with DeepSpeed's clip_grad_norm_ but drops the norm it
    returns, so get_global_grad_norm() is None where the ZeRO-1/2 engine it stands in for reported
    one (the trainer's health check reads it): the same clipping, keeping the norm."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients


def build_teacher_engine(model: nn.Module, ds_config: dict[str, Any]):
    """The frozen teacher as a DeepSpeed ZeRO-3 engine without an optimizer: each rank keeps
    1/world of every parameter (on the device, or offloaded to CPU/NVMe) and gathers a layer's
    weights just before that layer runs. Call `engine.module(...)`: the gather hooks live on the
    module, and a backward through its activations (the generator step) must not go through
    the engine, whose backward is for training. Needs the process group (distributed.init())."""
    import deepspeed

    model.eval()
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=fill_model_autos(ds_config, model))
    engine.module.eval()
    engine.module.requires_grad_(False)
    return engine


def place_frozen_teacher(model: nn.Module, dtype: str, device: torch.device) -> nn.Module:
    """Frozen, in eval mode, on the device in the run's precision; gradients may still flow
    through its activations (the generator step)."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=TORCH_DTYPES[dtype])


class RunEngines:
    """The engines of one run and their step budgets, all read from the run config.

    `ds_configs`: the finalized DeepSpeed configs (ds_config.resolve_run_ds_configs);
    `batches_per_epoch`: global micro-batches in one epoch of the training set."""

    def __init__(self, cfg: RunConfig, ds_configs: dict[str, dict[str, Any]], dtype: str, batches_per_epoch: int):
        self.cfg, self.ds_configs, self.dtype = cfg, ds_configs, dtype
        self.batches_per_epoch = batches_per_epoch

    # -- step budgets: one step = one global batch (micro-batches x accumulation) of an engine

    def _steps(self, epochs: float) -> int:
        return steps_from_epochs(epochs, self.batches_per_epoch, self.cfg.train.gradient_accumulation_steps)

    @property
    def teacher_finetune_steps(self) -> int:
        return self._steps(self.cfg.models.teacher_finetune_epochs)

    @property
    def student_phase_steps(self) -> int:
        """Steps of the student phase: for matekd, generator and student steps together."""
        budget, m = self.cfg.train.max_steps or self._steps(self.cfg.train.epochs), self.cfg.matekd
        if self.cfg.method == "matekd" and m.extra_generator_steps:
            return steps_holding_student_steps(budget, m.generator_steps, m.student_steps)
        return budget

    @property
    def student_optimizer_steps(self) -> int:
        total, m = self.student_phase_steps, self.cfg.matekd
        if self.cfg.method != "matekd":
            return total
        return count_student_steps(total, m.generator_steps, m.student_steps)

    # -- the engines. A trained model trains in train mode (dropout on): from_pretrained hands
    #    models back in eval mode, and DeepSpeed leaves the mode as it finds it.

    def _build(self, model: nn.Module, role: str, ds_role: str, lr: float, weight_decay: float, total: int,
               warmup_ratio: float = 0.0, schedule: str = "linear"):
        return build_engine(model.train(), EngineSpec(
            role, dict(self.ds_configs[ds_role]), lr, weight_decay, max(1, total),
            warmup_steps=int(warmup_ratio * total), schedule=schedule,
            single_rank_fast_path=self.cfg.deepspeed.single_rank_fast_path,
        ))

    def teacher_finetune(self, model: nn.Module):
        """Fine-tuning the teacher (method ft) trains it with the student's DeepSpeed config."""
        m = self.cfg.models
        return self._build(model, "teacher", "student", m.teacher_finetune_lr, self.cfg.train.weight_decay,
                           self.teacher_finetune_steps, m.teacher_finetune_warmup_ratio)

    def generator_warmup(self, model: nn.Module):
        m = self.cfg.matekd
        return self._build(model, "generator", "generator", m.generator_mlm_warmup_lr,
                           m.generator_mlm_warmup_weight_decay, m.generator_mlm_warmup_steps,
                           m.generator_mlm_warmup_ratio)

    def frozen_generator(self, model: nn.Module, device: torch.device) -> nn.Module:
        """method kd-aug: the warmed generator only samples, so it gets no engine and no optimizer
        state. On the device in the run's precision, without gradients, and in train mode (dropout
        on), as MATE-KD's student steps sample it: kd-aug is the kd-frozen arm that issue 27
        measured, not a new one (tests/test_kd_aug.py: the same student, bit for bit)."""
        model.requires_grad_(False)
        return model.train().to(device=device, dtype=TORCH_DTYPES[self.dtype])

    def student(self, model: nn.Module):
        t = self.cfg.train
        return self._build(model, "student", "student", t.lr, t.weight_decay, self.student_optimizer_steps,
                           t.warmup_ratio)

    def generator(self, model: nn.Module):
        """MATE-KD's generator: AdamW at a constant learning rate (the official code's)."""
        steps = self.student_phase_steps - self.student_optimizer_steps
        return self._build(model, "generator", "generator", self.cfg.matekd.generator_lr, 0.0, steps,
                           schedule="constant")

    def frozen_teacher(self, model: nn.Module, device: torch.device) -> Teacher:
        """The frozen teacher: a ZeRO-3 inference engine when deepspeed.teacher asks for one
        (parameters partitioned over the ranks), else a plain module on every rank."""
        if "teacher" in self.ds_configs:
            engine = build_teacher_engine(model, self.ds_configs["teacher"])
            return Teacher(engine.module, engine=engine)
        return Teacher(place_frozen_teacher(model, self.dtype, device))
