"""The run config: nested dataclasses, loaded from YAML/JSON plus dotted CLI overrides, validated.

Every key a user can write is a dataclass field here, so an unknown key or a value of the wrong
type is caught before anything runs, with a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from matekd_ds.errors import MatekdError

METHODS = ("ft", "kd", "matekd", "kd-aug")
# The methods whose student step adds the divergence on masked-and-rewritten text (methods/matekd.py):
# MATE-KD, and kd-aug, its student step with the warmed generator frozen (masked-LM augmentation).
AUGMENTING = ("matekd", "kd-aug")
PERTURBATIONS = ("generator", "random")  # matekd.perturbation
# AdamW moves every weight by about lr per step: above 1 no training converges, it only overflows.
MAX_LR = 1.0
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SyntheticConfig:
    """The built-in procedural sentiment task (see data/synthetic.py)."""

    train_size: int = 4000
    dev_size: int = 1000
    seed: int = 1234


@dataclass
class DataConfig:
    # GLUE: null = the hub; a directory in GLUE TSV format = local files.
    path: str | None = None
    # Custom tasks (task: custom): CSV/TSV/JSONL files and their columns.
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    # CSV/TSV files without a header line: text_columns and label_column are 0-based numbers.
    no_header: bool = False
    label_names: list[str] | None = None
    regression: bool = False
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    main_metric: str = "accuracy"
    max_length: int = 128
    # Training batches of similar length (HF Trainer's group_by_length, fairseq's buckets): each
    # epoch's examples sorted by token count, cut into batches, batches in a seeded random order.
    # Same batches per epoch, same examples, resumable; far less padding on real text.
    group_by_length: bool = False
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelsConfig:
    """Each model is a local path, a hub id, or `builtin:<name>` (tiny models built from configs)."""

    teacher: str = "builtin:tiny-teacher"
    student: str = "builtin:tiny-student"
    generator: str = "builtin:tiny-generator"
    # Tokenizer path or hub id; null = the teacher's, or (builtin teacher) a WordPiece
    # tokenizer trained on the task's training text with at most this many tokens.
    tokenizer: str | None = None
    builtin_tokenizer_vocab_size: int = 8000
    # Fine-tune the teacher (method ft) for this many epochs before distilling. null = auto:
    # only a builtin (randomly initialised) teacher is fine-tuned, for 3 epochs.
    teacher_finetune_epochs: float | None = None
    teacher_finetune_lr: float = 1e-4
    teacher_finetune_warmup_ratio: float = 0.1  # of its steps, spent on a linear learning-rate warm-up
    # Initialise the student from these teacher layers (DistilBERT-style); null = load as given.
    student_init_from_teacher_layers: list[int] | None = None


@dataclass
class MatekdConfig:
    """The MATE-KD algorithm; defaults are the official code's."""

    mask_prob: float = 0.3
    gumbel_tau: float = 1.0
    temperature: float = 1.0
    generator_steps: int = 10  # n_G: generator batches per cycle
    student_steps: int = 100  # n_S: student batches per cycle
    generator_lr: float = 5e-7
    generator_clip: float = 5.0
    # false (the official code): generator batches are drawn from train.epochs / max_steps, so
    # MATE-KD's student gets fewer updates than KD's at the same epochs. true: the budget counts
    # student steps only and the generator's steps come on top (an equal-step comparison with KD).
    extra_generator_steps: bool = False
    # Student-step weights: CE(labels), divergence(clean), divergence(perturbed).
    loss_weights: list[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])
    # Masked-LM warm-up of the generator on the task's own training text before MATE-KD, for a
    # generator built from an encoder checkpoint (no pretrained MLM head: a fresh head tied to
    # the word embeddings). 0 = none. Masks like MATE-KD does (mask_prob, all mask tokens).
    generator_mlm_warmup_steps: int = 0
    generator_mlm_warmup_lr: float = 1e-4
    generator_mlm_warmup_ratio: float = 0.1  # of its steps, spent on a linear learning-rate warm-up
    generator_mlm_warmup_weight_decay: float = 0.01
    # The generator's last encoder layer computed at the masked rows only (its output is read
    # there alone): the same logits, less work. BERT-family encoders; others run it whole.
    generator_last_layer_masked_rows: bool = True
    # MATE-KD's generator cut to its first k encoder layers (after any MLM warm-up), keeping its
    # MLM head: a cheaper adversary. null = all of them.
    generator_layers: int | None = None
    # What rewrites the masked tokens. generator: the adversarial masked LM (MATE-KD). random: a
    # control arm, each masked token replaced by one drawn uniformly from the vocabulary without
    # the tokenizer's special tokens (the same masks; the same student step). With random no
    # generator is loaded, warmed up or trained: generator_steps and generator_mlm_warmup_steps
    # are taken as 0 (and recorded so in config.yaml), models.generator and the generator_* keys
    # are not read.
    perturbation: str = "generator"
    # Measure the adversary (adversary.py): after every generator phase, the divergence on a fixed
    # probe set perturbed by the trained generator and by a frozen copy of the generator as the
    # student phase got it, and how far its weights moved. Logged as generator/adversary_*,
    # recorded per phase in metrics.json "adversary". Needs perturbation generator,
    # generator_steps > 0 and a generator below ZeRO-3 (the copy is whole).
    adversary_probe: bool = False
    adversary_probe_batches: int = 4  # training micro-batches per rank in the probe set


@dataclass
class KdConfig:
    """Hinton KD: alpha * CE(labels) + (1 - alpha) * T^2 * divergence."""

    alpha: float = 0.5
    temperature: float = 1.0


@dataclass
class TrainConfig:
    epochs: float = 3.0
    # optimizer steps (both engines' batches, see matekd.extra_generator_steps); overrides epochs
    max_steps: int | None = None
    micro_batch_size: int = 32  # per rank
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    clip: float = 5.0
    seed: int = 42
    # auto = what the DeepSpeed configs of the trained engines (student, generator) enable, else
    # fp32; they must agree. The teacher runs in the same precision.
    dtype: str = "auto"
    # kd/matekd: compute the frozen teacher's clean-text logits once (one sharded pass over the
    # training set) instead of in every step. Same values, one teacher forward fewer per step.
    cache_teacher_logits: bool = True
    # The forwards that need no gradient in training steps (the teacher's, and MATE-KD's
    # generator in student steps) under autocast to this precision; null = the run's precision.
    # bf16 on a CPU with AVX512-BF16 or AMX, or a GPU, for an fp32 run.
    frozen_forward_dtype: str | None = None
    # Overrides the ZeRO stage of the trained engines (student, generator, and the teacher when it
    # is fine-tuned); the frozen teacher's engine is set by deepspeed.teacher.
    zero_stage: int | None = None
    # fp16 only: DeepSpeed skips a step whose scaled gradients overflow and lowers the loss scale;
    # more skips than this in a row stop the run as diverged. (bf16/fp32: any skip does.)
    max_overflow_skips: int = 50


@dataclass
class EvalConfig:
    every_steps: int = 200  # 0 = only at the end
    batch_size: int = 64  # per rank
    save_best: bool = True
    # metrics.json "deployment" (deployment.py): student and teacher CPU latency at batch 1 and
    # 32 and the run's max length, timed after training by rank 0 (false: sizes only)
    deployment_latency: bool = True
    latency_warmup: int = 3  # untimed forwards first
    latency_iterations: int = 20  # timed forwards per model and batch size (p50, p90)


@dataclass
class DeepSpeedConfig:
    """Per-engine DeepSpeed configs: a preset name from ds_configs/, a JSON path, or presets
    joined with '+' (zero3+bf16+offload)."""

    student: str = "zero2"
    generator: str = "zero2"
    # The frozen teacher: "none" = a plain module on every rank; a ZeRO-3 preset
    # (teacher-inference, teacher-inference+offload) = a DeepSpeed engine without an optimizer
    # whose parameters are partitioned over the ranks (a teacher larger than one device).
    teacher: str = "none"
    # Where "offload" presets put offloaded tensors: null = CPU memory, a path = NVMe there.
    nvme_path: str | None = None
    # At world size 1, skip DeepSpeed's gradient all-reduce over the one rank (engines.py). Used
    # only on the DeepSpeed versions it was verified against; false = DeepSpeed's own path.
    single_rank_fast_path: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/matekd-default"
    overwrite: bool = False
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    csv: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    # A GLUE task name, "synthetic" (the built-in offline task) or "custom" (data.train_file...).
    task: str = "synthetic"
    # ft, kd, matekd, or kd-aug: MATE-KD's student step with its warmed generator frozen (no
    # generator steps, no generator engine or optimizer state; the matekd.* keys of the student
    # step and the generator's warm-up apply, generator_steps is taken as 0).
    method: str = "matekd"
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    matekd: MatekdConfig = field(default_factory=MatekdConfig)
    kd: KdConfig = field(default_factory=KdConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a config from plain data, with type checks that name the offending key.


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except MatekdError as err:
                errors.append(str(err))
        raise MatekdError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MatekdError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise MatekdError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MatekdError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MatekdError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise MatekdError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
        raise MatekdError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise MatekdError(f"config key '{key}' must be a string, got {value!r}")
    raise MatekdError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise MatekdError(
                f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(names)})"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` deep-merged over `base` (nested mappings merged key by key); neither is modified."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=1e-4` -> {"train": {"lr": 0.0001}}; the value is parsed as YAML."""
    if "=" not in text:
        raise MatekdError(f"override '{text}' must look like key.path=value")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise MatekdError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; accept it as the number it obviously is.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    out: dict[str, Any] = value
    for key in reversed(keys):
        out = {key: out}
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MatekdError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise MatekdError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {first}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MatekdError(f"config file {path} must hold a mapping at the top level")
    return expand_env(_fix_yaml_floats(data), f"config file {path}")


_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")


def expand_env(value: Any, where: str) -> Any:
    """Every ${VAR} in the strings of `value` replaced by that environment variable (a model's
    folder differs between machines: `teacher: ${MINILM}`). An unset or empty one is an error: an
    empty path would surface later as a misleading "teacher needs 'model'"."""
    if isinstance(value, dict):
        return {k: expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if isinstance(value, str):
        for name in _ENV_REFERENCE.findall(value):
            if not os.environ.get(name):
                state = "is empty" if name in os.environ else "is not set"
                raise MatekdError(f"{where}: environment variable {name} in '{value}' {state}")
        return _ENV_REFERENCE.sub(lambda ref: os.environ[ref[1]], value)
    return value


def _fix_yaml_floats(data: Any) -> Any:
    """YAML 1.1 leaves exponent floats without a dot ("2e-5") as strings; read them as numbers."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str):
        try:
            return float(data) if "e" in data.lower() and data.strip()[0] in "+-.0123456789" else data
        except ValueError:
            return data
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                for_training: bool = True) -> RunConfig:
    """`path` (None: the defaults of this file, which are the README's) plus dotted overrides."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    for text in overrides or []:
        data = merge(data, parse_override(text))
    return config_from_dict(data, for_training)


def config_from_dict(data: dict[str, Any], for_training: bool = True) -> RunConfig:
    """for_training=False (`matekd eval`/`predict`): a custom task needs no training file."""
    cfg = _build(RunConfig, data)
    validate(cfg, for_training)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MatekdError(message)


def augments(cfg: RunConfig) -> bool:
    """Whether the student also learns on masked-and-rewritten text (matekd, kd-aug)."""
    return cfg.method in AUGMENTING


def uses_generator(cfg: RunConfig) -> bool:
    """Whether the run loads a generator: matekd or kd-aug, unless the masked tokens are random ones."""
    return augments(cfg) and cfg.matekd.perturbation == "generator"


def _check_perturbation(cfg: RunConfig) -> None:
    """matekd.perturbation and the adversary probe; random takes the generator's steps as 0."""
    m = cfg.matekd
    _check(m.perturbation in PERTURBATIONS,
           f"matekd.perturbation must be one of {', '.join(PERTURBATIONS)}, got '{m.perturbation}'")
    _check(m.adversary_probe_batches >= 1,
           f"matekd.adversary_probe_batches must be >= 1, got {m.adversary_probe_batches}")
    if cfg.method == "kd-aug":  # the generator only rewrites text: it is never trained
        _check(not m.adversary_probe, "matekd.adversary_probe measures the generator's training; method kd-aug "
                                      "never trains it (use method matekd)")
        m.generator_steps = 0
    if m.perturbation == "random":  # no generator: nothing to train or warm up
        m.generator_steps = m.generator_mlm_warmup_steps = 0
    if m.adversary_probe and cfg.method == "matekd":
        _check(m.perturbation == "generator",
               "matekd.adversary_probe measures the generator; matekd.perturbation random has none")
        _check(m.generator_steps > 0,
               "matekd.adversary_probe measures the generator's training; matekd.generator_steps 0 never trains it")


def validate(cfg: RunConfig, for_training: bool = True) -> None:
    """Value checks that types alone cannot express."""
    _check(cfg.method in METHODS, f"method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    _check(cfg.train.dtype in DTYPES, f"train.dtype must be one of {', '.join(DTYPES)}, got '{cfg.train.dtype}'")
    m = cfg.matekd
    _check(0.0 < m.mask_prob <= 1.0, f"matekd.mask_prob must be in (0, 1], got {m.mask_prob}")
    _check(m.gumbel_tau > 0, f"matekd.gumbel_tau must be > 0, got {m.gumbel_tau}")
    _check(m.temperature > 0, f"matekd.temperature must be > 0, got {m.temperature}")
    _check(m.generator_steps >= 0, f"matekd.generator_steps must be >= 0, got {m.generator_steps}")
    _check(m.student_steps >= 1, f"matekd.student_steps must be >= 1, got {m.student_steps}")
    _check(len(m.loss_weights) == 3,
           "matekd.loss_weights needs 3 numbers: CE, divergence(clean), divergence(perturbed)")
    _check(all(w >= 0 for w in m.loss_weights), f"matekd.loss_weights must be >= 0, got {m.loss_weights}")
    _check(0 <= m.generator_lr <= MAX_LR, f"matekd.generator_lr must be in [0, {MAX_LR}], got {m.generator_lr}")
    _check(m.generator_mlm_warmup_steps >= 0,
           f"matekd.generator_mlm_warmup_steps must be >= 0, got {m.generator_mlm_warmup_steps}")
    _check(0 < m.generator_mlm_warmup_lr <= MAX_LR,
           f"matekd.generator_mlm_warmup_lr must be in (0, {MAX_LR}], got {m.generator_mlm_warmup_lr}")
    _check(0.0 <= m.generator_mlm_warmup_ratio < 1.0,
           f"matekd.generator_mlm_warmup_ratio must be in [0, 1), got {m.generator_mlm_warmup_ratio}")
    _check(m.generator_mlm_warmup_weight_decay >= 0,
           f"matekd.generator_mlm_warmup_weight_decay must be >= 0, got {m.generator_mlm_warmup_weight_decay}")
    _check(m.generator_layers is None or m.generator_layers >= 1,
           f"matekd.generator_layers must be >= 1 (or null for all), got {m.generator_layers}")
    _check_perturbation(cfg)
    _check(cfg.train.frozen_forward_dtype in (None, "bf16", "fp16"),
           f"train.frozen_forward_dtype must be null, bf16 or fp16, got '{cfg.train.frozen_forward_dtype}'")
    _check(0.0 <= cfg.kd.alpha <= 1.0, f"kd.alpha must be in [0, 1], got {cfg.kd.alpha}")
    _check(cfg.kd.temperature > 0, f"kd.temperature must be > 0, got {cfg.kd.temperature}")
    t = cfg.train
    _check(t.epochs > 0 or (t.max_steps or 0) > 0, "train.epochs or train.max_steps must be > 0")
    _check(t.max_steps is None or t.max_steps > 0, f"train.max_steps must be > 0, got {t.max_steps}")
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
    _check(0 < t.lr <= MAX_LR, f"train.lr must be in (0, {MAX_LR}], got {t.lr}")
    _check(t.max_overflow_skips >= 1, f"train.max_overflow_skips must be >= 1, got {t.max_overflow_skips}")
    _check(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _check(t.clip >= 0, f"train.clip must be >= 0, got {t.clip}")
    _check(t.zero_stage is None or t.zero_stage in (0, 1, 2, 3),
           f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    _check(cfg.data.max_length >= 8, f"data.max_length must be >= 8, got {cfg.data.max_length}")
    for key in ("max_train_examples", "max_eval_examples"):
        value = getattr(cfg.data, key)
        _check(value is None or value > 0, f"data.{key} must be > 0, got {value}")
    _check(cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1")
    _check(cfg.eval.latency_warmup >= 0, f"eval.latency_warmup must be >= 0, got {cfg.eval.latency_warmup}")
    _check(cfg.eval.latency_iterations >= 1, f"eval.latency_iterations must be >= 1, got {cfg.eval.latency_iterations}")
    _check(cfg.output.checkpoint_every >= 0, "output.checkpoint_every must be >= 0")
    _check(cfg.output.keep_checkpoints >= 1, "output.keep_checkpoints must be >= 1")
    _check(cfg.logging.log_every >= 1, "logging.log_every must be >= 1")
    if cfg.models.teacher_finetune_epochs is None:
        cfg.models.teacher_finetune_epochs = 3.0 if cfg.models.teacher.startswith("builtin:") else 0.0
    _check(cfg.models.teacher_finetune_epochs >= 0, "models.teacher_finetune_epochs must be >= 0")
    _check(0 < cfg.models.teacher_finetune_lr <= MAX_LR,
           f"models.teacher_finetune_lr must be in (0, {MAX_LR}], got {cfg.models.teacher_finetune_lr}")
    _check(0.0 <= cfg.models.teacher_finetune_warmup_ratio < 1.0,
           f"models.teacher_finetune_warmup_ratio must be in [0, 1), got {cfg.models.teacher_finetune_warmup_ratio}")
    _check(bool(cfg.output.dir), "output.dir must not be empty")
    if cfg.data.no_header and cfg.task == "custom":
        named = [c for c in (*cfg.data.text_columns, cfg.data.label_column) if not str(c).isdigit()]
        _check(not named, f"data.no_header: name the columns by number from 0 (data.text_columns=[0] "
                          f"data.label_column=1), not {named[0] if named else ''!r}")
    if cfg.task == "custom" and for_training:
        _check(bool(cfg.data.train_file), "task: custom needs data.train_file")
        _check(bool(cfg.data.dev_file), "task: custom needs data.dev_file")
    if cfg.task != "custom" and for_training:
        # training would read the task's own data and drop these without a word
        source = "the built-in offline data" if cfg.task == "synthetic" else "its GLUE folder, data.path"
        for key in ("train_file", "dev_file", "no_header"):
            _check(not getattr(cfg.data, key),
                   f"data.{key} is read only by task: custom; task {cfg.task} trains on {source}")
    if cfg.task in ("synthetic", "custom") and for_training:
        _check(not cfg.data.path, f"data.path is a GLUE task's folder; task {cfg.task} does not read it "
                                  "(give task=sst2, mnli, ... for GLUE data)")

