"""DeepSpeed engines for the trained models (student, generator) and the frozen teacher.

Each engine's DeepSpeed config comes from ds_configs/ (a preset name) or a JSON path. The run
config owns what must agree across engines: micro-batch, gradient accumulation and precision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matekd_ds.errors import MatekdError

DTYPE_KEYS = {"bf16": "bf16", "fp16": "fp16"}
SUPPORTED_ZERO_STAGES = (0, 1, 2)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def preset_names() -> list[str]:
    folder = resources.files("matekd_ds.ds_configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def read_ds_config(name_or_path: str) -> dict[str, Any]:
    """A preset from ds_configs/ by name, or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise MatekdError(f"DeepSpeed config not found: {path}")
        text, where = path.read_text(), str(path)
    else:
        preset = resources.files("matekd_ds.ds_configs") / f"{name_or_path}.json"
        if not preset.is_file():
            raise MatekdError(f"unknown DeepSpeed preset '{name_or_path}' (presets: {', '.join(preset_names())}; or give a .json path)")
        text, where = preset.read_text(), f"preset {name_or_path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MatekdError(f"DeepSpeed config {where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MatekdError(f"DeepSpeed config {where} must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise MatekdError(
                f"DeepSpeed config {where} defines '{key}': matekd-ds builds optimizers and schedulers "
                "from the run config (train.lr, matekd.generator_lr); remove it"
            )
    data["_source"] = where
    return data


def config_dtype(ds_config: dict[str, Any]) -> str:
    enabled = [name for name in DTYPE_KEYS if ds_config.get(name, {}).get("enabled") is True]
    if len(enabled) > 1:
        raise MatekdError(f"DeepSpeed config {ds_config['_source']} enables both bf16 and fp16")
    return enabled[0] if enabled else "fp32"


def resolve_dtype(requested: str, ds_configs: dict[str, dict[str, Any]]) -> str:
    """One precision for every engine: train.dtype, or (auto) what the DeepSpeed configs say."""
    declared = {role: config_dtype(c) for role, c in ds_configs.items()}
    explicit = {role: d for role, d in declared.items() if d != "fp32"}
    if requested == "auto":
        choices = set(explicit.values())
        if len(choices) > 1 or (choices and len(explicit) < len(declared)):
            listed = ", ".join(f"{role}: {d}" for role, d in declared.items())
            raise MatekdError(f"engines disagree on precision ({listed}); set train.dtype or use matching DeepSpeed configs")
        return choices.pop() if choices else "fp32"
    for role, d in explicit.items():
        if d != requested:
            raise MatekdError(f"train.dtype is {requested} but the {role} DeepSpeed config ({ds_configs[role]['_source']}) enables {d}")
    return requested


def _fill(ds: dict[str, Any], key: str, value: Any, owner: str) -> None:
    """Set `key` unless the file gives a concrete value; a concrete value must agree."""
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise MatekdError(f"DeepSpeed config {ds['_source']} sets {key}={current} but the run config needs {value} ({owner})")
    ds[key] = value


def finalize_ds_config(
    ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, clip: float,
    dtype: str, zero_stage: int | None,
) -> dict[str, Any]:
    ds = json.loads(json.dumps(ds))
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "micro batch x accumulation x world size")
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip
    for name in DTYPE_KEYS:
        block = dict(ds.get(name, {}))
        block["enabled"] = name == dtype
        ds[name] = block
    zero = dict(ds.get("zero_optimization", {}))
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in SUPPORTED_ZERO_STAGES:
        # Stage 3 partitions the word embeddings that the soft one-hot multiplies and needs a
        # gathered export; until that path exists, refuse it rather than save empty weights.
        raise MatekdError(
            f"DeepSpeed config {ds['_source']}: zero_optimization.stage {zero['stage']} is not supported; use 0, 1 or 2"
        )
    ds["zero_optimization"] = zero
    ds.setdefault("steps_per_print", 10**9)
    ds.pop("_source")
    return ds


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
    except Exception:  # noqa: BLE001 - absent, or built without its CUDA extensions
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


def build_engine(model: nn.Module, spec: EngineSpec):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    optimizer = build_optimizer(model, spec.lr, spec.weight_decay, on_cuda)
    if spec.schedule == "linear":
        factor = linear_schedule(spec.total_steps, spec.warmup_steps)
    else:
        factor = constant_schedule
    # A callable: DeepSpeed hands it the optimizer it actually steps (the ZeRO-wrapped one's base).
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731
    if apex_fused_adam() is not None and on_cuda:
        spec.ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=spec.ds_config,
    )
    return engine


def prepare_teacher(model: nn.Module, dtype: str, device: torch.device) -> nn.Module:
    """Frozen and in eval mode; gradients may still flow through its activations."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=TORCH_DTYPES[dtype])


def steps_from_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))
