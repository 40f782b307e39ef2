"""DeepSpeed config resolution: every engine's DeepSpeed config, from presets and the run config.

Each engine's config comes from ds_configs/ (a preset name), a JSON path, or several of either
joined by '+' (zero3+bf16+offload). The run config owns what must agree across engines:
micro-batch, gradient accumulation and precision; "auto" values are filled from it, a concrete
value that disagrees is an error. Nothing here builds an engine (that is engines.py).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from matekd_ds.config import RunConfig, uses_generator
from matekd_ds.errors import MatekdError

HALF_DTYPES = ("bf16", "fp16")  # the DeepSpeed config blocks that switch precision on
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
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
    if PRESET_JOIN in spec and not Path(spec).is_file():  # "zero1+my.json" joins; "my+file.json" is one file
        names = [part.strip() for part in spec.split(PRESET_JOIN)]
        data = _merge_presets([(name, _read_one(name)) for name in names])
        where = f"presets {spec}"
    else:
        data = _read_one(spec)
        where = str(Path(spec)) if _is_path(spec) else f"preset {spec}"
    data["_source"] = where
    return data


def config_dtype(ds_config: dict[str, Any]) -> str:
    enabled = [name for name in HALF_DTYPES if ds_config.get(name, {}).get("enabled") is True]
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
            raise MatekdError(f"engines disagree on precision ({listed}); "
                              "set train.dtype or use matching DeepSpeed configs")
        return choices.pop() if choices else "fp32"
    for role, d in explicit.items():
        if d != requested:
            raise MatekdError(f"train.dtype is {requested} but the {role} DeepSpeed config "
                              f"({ds_configs[role]['_source']}) enables {d}")
    return requested


def _fill(ds: dict[str, Any], key: str, value: Any, owner: str) -> None:
    """Set `key` unless the file gives a concrete value; a concrete value must agree."""
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise MatekdError(f"DeepSpeed config {ds['_source']} sets {key}={current} "
                          f"but the run config needs {value} ({owner})")
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
        raise MatekdError(f"DeepSpeed config {source}: zero_optimization.stage {zero['stage']} is not supported; "
                          "use 0, 1, 2 or 3")
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
        raise MatekdError(f"the teacher's DeepSpeed config {ds['_source']} enables {declared} "
                          f"but the run trains in {dtype}")
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


def _fill_common(ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                 dtype: str) -> dict[str, Any]:
    ds = json.loads(json.dumps(ds))
    ds.pop(META_KEY, None)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "micro batch x accumulation x world size")
    for name in HALF_DTYPES:
        block = dict(ds.get(name, {}))
        block["enabled"] = name == dtype
        ds[name] = block
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _offloads(zero: dict[str, Any], key: str) -> bool:
    return (zero.get(key) or {}).get("device", "none") not in ("none", None)


def _resolve_offload(zero: dict[str, Any], source: str, *, role: str, nvme_path: str | None,
                     has_optimizer: bool) -> None:
    """`"device": "auto"` (the offload preset) means: offload what this engine holds at this
    stage, to NVMe when deepspeed.nvme_path is set, else to CPU. An explicit device must fit."""
    stage = zero["stage"]
    autos = [key for key in ("offload_param", "offload_optimizer") if (zero.get(key) or {}).get("device") == "auto"]
    for key, what, min_stage in (("offload_param", "parameter offload", 3),
                                 ("offload_optimizer", "optimizer offload", 1)):
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
            raise MatekdError(f"DeepSpeed config {source}: zero_optimization.{key}.device must be cpu or nvme, "
                              f"got {device!r}")
        if key == "offload_optimizer" and not has_optimizer:
            raise MatekdError(f"DeepSpeed config {source}: the {role} has no optimizer, "
                              f"so zero_optimization.{key} means nothing; remove it")
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


def resolve_run_ds_configs(cfg: RunConfig, world_size: int,
                           with_teacher: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """Every engine's finalized DeepSpeed config for a run, and the run's one precision.

    Keys: "student", "generator" (method matekd, unless matekd.perturbation is random) and
    "teacher" (a ZeRO-3 teacher engine, when deepspeed.teacher is not "none" and the run has a
    teacher). Teacher fine-tuning and the generator's MLM warm-up train with the student's and the
    generator's configs."""
    roles = ["student"] + (["generator"] if uses_generator(cfg) else [])
    raw = {role: read_ds_config(getattr(cfg.deepspeed, role)) for role in roles}
    dtype = resolve_dtype(cfg.train.dtype, raw)
    clips = {"student": cfg.train.clip, "generator": cfg.matekd.generator_clip}
    ds_configs = {
        role: finalize_ds_config(
            raw[role], micro_batch=cfg.train.micro_batch_size, grad_accum=cfg.train.gradient_accumulation_steps,
            world_size=world_size, clip=clips[role], dtype=dtype, zero_stage=cfg.train.zero_stage,
            role=role, nvme_path=cfg.deepspeed.nvme_path,
        )
        for role in roles
    }
    if with_teacher and cfg.deepspeed.teacher != TEACHER_PLAIN:
        ds_configs["teacher"] = finalize_teacher_ds_config(
            read_ds_config(cfg.deepspeed.teacher), micro_batch=cfg.eval.batch_size, world_size=world_size,
            dtype=dtype, nvme_path=cfg.deepspeed.nvme_path,
        )
    return ds_configs, dtype
