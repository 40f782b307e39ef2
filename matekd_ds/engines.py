"""DeepSpeed engines for the trained models (student, generator) and the frozen teacher.

Each engine's DeepSpeed config comes from ds_configs/ (a preset name), a JSON path, or several
of either joined by '+' (zero3+bf16+offload). The run config owns what must agree across
engines: micro-batch, gradient accumulation and precision. The teacher is a plain frozen module
(deepspeed.teacher: none) or a ZeRO-3 engine without an optimizer (teacher-inference), whose
parameters are partitioned over the ranks.
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
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESET_JOIN = "+"  # "zero3+bf16+offload": presets merged left to right
TEACHER_PLAIN = "none"  # deepspeed.teacher: a frozen module on every rank, no DeepSpeed engine
# Marks a preset that builds an engine without an optimizer (teacher-inference); never sent to DeepSpeed.
META_KEY = "matekd"


def preset_names() -> list[str]:
    folder = resources.files("matekd_ds.ds_configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _is_path(name_or_path: str) -> bool:
    """A JSON file, not a preset name (a directory named like a preset does not count)."""
    return Path(name_or_path).suffix == ".json" or Path(name_or_path).is_file()


def _read_one(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if _is_path(name_or_path):
        if not path.is_file():
            raise MatekdError(f"DeepSpeed config not found: {path}")
        text, where = path.read_text(), str(path)
    else:
        preset = resources.files("matekd_ds.ds_configs") / f"{name_or_path}.json"
        if not name_or_path or not preset.is_file():
            raise MatekdError(f"unknown DeepSpeed preset '{name_or_path}' (presets: {', '.join(preset_names())}; "
                              f"join them with '{PRESET_JOIN}', e.g. zero3{PRESET_JOIN}bf16; or give a .json path)")
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
    return data


def _merge_presets(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Deep-merge preset dicts; two parts that set one key to different values is an error."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}

    def merge(into: dict[str, Any], data: dict[str, Any], name: str, prefix: str) -> None:
        for key, value in data.items():
            where = prefix + key
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value, name, where + ".")
            elif key in into and into[key] != value:
                raise MatekdError(
                    f"DeepSpeed presets {owner[where]} and {name} disagree on {where} "
                    f"({json.dumps(into[key])} vs {json.dumps(value)}); combine presets that set different things"
                )
            else:
                into[key] = json.loads(json.dumps(value))
                owner[where] = name
                if isinstance(value, dict):
                    for sub in _leaf_paths(value, where + "."):
                        owner[sub] = name

    for name, data in parts:
        merge(merged, data, name, "")
    return merged


def _leaf_paths(data: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for key, value in data.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out.extend(_leaf_paths(value, prefix + key + "."))
    return out


def read_ds_config(name_or_path: str) -> dict[str, Any]:
    """A preset from ds_configs/ by name, a JSON file by path, or several of either joined by
    '+' ("zero3+bf16+offload"), merged left to right."""
    spec = name_or_path.strip()
    if PRESET_JOIN in spec and not _is_path(spec):
        names = [part.strip() for part in spec.split(PRESET_JOIN)]
        data = _merge_presets([(name, _read_one(name)) for name in names])
        where = f"presets {spec}"
    else:
        data = _read_one(spec)
        where = str(Path(spec)) if _is_path(spec) else f"preset {spec}"
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
    dtype: str, zero_stage: int | None, role: str = "student", nvme_path: str | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config a trained engine (student, generator, teacher fine-tuning) gets:
    "auto" values filled from the run config, the stage checked against the offload blocks."""
    meta = dict(ds.get(META_KEY, {}))
    if meta.get("inference_only"):
        raise MatekdError(
            f"DeepSpeed config {ds['_source']} is inference-only (a ZeRO-3 engine without an optimizer): "
            f"use it for deepspeed.teacher, not for the {role}"
        )
    ds = _fill_common(ds, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, dtype=dtype)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip
    zero = dict(ds.get("zero_optimization", {}))
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    source = ds.pop("_source")
    if zero["stage"] not in SUPPORTED_ZERO_STAGES:
        raise MatekdError(f"DeepSpeed config {source}: zero_optimization.stage {zero['stage']} is not supported; use 0, 1, 2 or 3")
    _resolve_offload(zero, source, role=role, nvme_path=nvme_path, has_optimizer=True)
    if _offloads(zero, "offload_optimizer"):
        # torch's (fused) AdamW steps the offloaded fp32 partitions on the CPU; without this flag
        # DeepSpeed refuses any optimizer but its own compiled DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds["zero_optimization"] = zero
    return ds


def finalize_teacher_ds_config(
    ds: dict[str, Any], *, micro_batch: int, world_size: int, dtype: str, nvme_path: str | None = None,
) -> dict[str, Any]:
    """The frozen teacher's engine: ZeRO-3 (parameters partitioned over the ranks, optionally
    offloaded to CPU or NVMe), inference only, in the run's precision."""
    declared = config_dtype(ds)
    if declared != "fp32" and declared != dtype:
        raise MatekdError(f"the teacher's DeepSpeed config {ds['_source']} enables {declared} but the run trains in {dtype}")
    ds = _fill_common(ds, micro_batch=micro_batch, grad_accum=1, world_size=world_size, dtype=dtype)
    source = ds.pop("_source")
    ds.pop("gradient_clipping", None)
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) != 3:
        raise MatekdError(
            f"deepspeed.teacher: {source} has ZeRO stage {zero.get('stage', 0)}, which partitions nothing without an "
            f"optimizer; use teacher-inference (ZeRO-3) or '{TEACHER_PLAIN}' for a plain frozen module"
        )
    _resolve_offload(zero, source, role="teacher", nvme_path=nvme_path, has_optimizer=False)
    ds["zero_optimization"] = zero
    return ds


def _fill_common(ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, dtype: str) -> dict[str, Any]:
    ds = json.loads(json.dumps(ds))
    ds.pop(META_KEY, None)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "micro batch x accumulation x world size")
    for name in DTYPE_KEYS:
        block = dict(ds.get(name, {}))
        block["enabled"] = name == dtype
        ds[name] = block
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _offloads(zero: dict[str, Any], key: str) -> bool:
    return (zero.get(key) or {}).get("device", "none") not in ("none", None)


def _resolve_offload(zero: dict[str, Any], source: str, *, role: str, nvme_path: str | None, has_optimizer: bool) -> None:
    """`"device": "auto"` (the offload preset) means: offload what this engine holds at this
    stage, to NVMe when deepspeed.nvme_path is set, else to CPU. An explicit device must fit."""
    stage = zero["stage"]
    autos = [key for key in ("offload_param", "offload_optimizer") if (zero.get(key) or {}).get("device") == "auto"]
    for key, what, min_stage in (("offload_param", "parameter offload", 3), ("offload_optimizer", "optimizer offload", 1)):
        block = zero.get(key)
        if not block:
            continue
        block = dict(block)
        device = block.get("device", "none")
        if device == "auto":
            if (key == "offload_optimizer" and not has_optimizer) or stage < min_stage:
                zero.pop(key)  # nothing of that kind to offload here
                continue
            device = "nvme" if nvme_path else "cpu"
            if key == "offload_optimizer" and stage < 3:
                device = "cpu"  # DeepSpeed offloads optimizer states to NVMe at stage 3 only
        if device in ("none", None):
            zero[key] = block
            continue
        if device not in ("cpu", "nvme"):
            raise MatekdError(f"DeepSpeed config {source}: zero_optimization.{key}.device must be cpu or nvme, got {device!r}")
        if key == "offload_optimizer" and not has_optimizer:
            raise MatekdError(f"DeepSpeed config {source}: the {role} has no optimizer, so zero_optimization.{key} means nothing; remove it")
        if stage < min_stage:
            raise MatekdError(
                f"DeepSpeed config {source}: {what} (zero_optimization.{key}) needs ZeRO stage {min_stage}"
                f"{' or higher' if min_stage < 3 else ''}, but the {role}'s stage is {stage}"
            )
        if device == "nvme":
            if key == "offload_optimizer" and stage < 3:
                raise MatekdError(f"DeepSpeed config {source}: optimizer offload to NVMe needs ZeRO stage 3; use cpu")
            block["nvme_path"] = block.get("nvme_path") or nvme_path
            if not block["nvme_path"]:
                raise MatekdError(f"DeepSpeed config {source}: zero_optimization.{key} offloads to nvme but no path is "
                                  "given: set deepspeed.nvme_path (or nvme_path in the block)")
        block["device"] = device
        zero[key] = block
    if autos and not any(_offloads(zero, key) for key in autos):
        raise MatekdError(
            f"DeepSpeed config {source}: offload has nothing to offload at ZeRO stage {stage} for the {role} "
            "(optimizer states need stage 1-3, parameters stage 3)"
        )


# Values DeepSpeed cannot take as "auto": they scale with the model (the Hugging Face recipe).
MODEL_AUTOS = {
    "stage3_param_persistence_threshold": lambda h: 10 * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "reduce_bucket_size": lambda h: h * h,
}


def fill_model_autos(ds: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Resolve the ZeRO bucket/threshold "auto" values from the model's hidden size (DeepSpeed's
    defaults when the model has none)."""
    zero = ds.get("zero_optimization", {})
    if not any(zero.get(key) == "auto" for key in MODEL_AUTOS):
        return ds
    ds = json.loads(json.dumps(ds))
    zero = ds["zero_optimization"]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for key, rule in MODEL_AUTOS.items():
        if zero.get(key) == "auto":
            if hidden:
                zero[key] = rule(int(hidden))
            else:
                zero.pop(key)
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
    ds_config = fill_model_autos(spec.ds_config, model)
    if apex_fused_adam() is not None and on_cuda:
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    return engine


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


def prepare_teacher(model: nn.Module, dtype: str, device: torch.device) -> nn.Module:
    """Frozen and in eval mode; gradients may still flow through its activations."""
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=TORCH_DTYPES[dtype])


def steps_from_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))
