"""Everything a run reads, loaded and checked before anything is written.

`prepare_inputs` turns a run config into `RunInputs`: the task's data, tokenised; the tokenizer;
every engine's DeepSpeed config and the run's precision; the teacher, student and generator
models as given (or, resuming, as an earlier phase of this run left them). Any problem with the
user's input (config, data, models, vocabularies, DeepSpeed configs) stops here with one line,
before DeepSpeed starts and before the run directory exists.

A model whose first engine is ZeRO-3 (the teacher with deepspeed.teacher: teacher-inference, a
student or generator at stage 3) is never loaded whole: here it is a `Partitioned` placeholder,
checked on a copy built on the meta device (no memory); `build_partitioned_models`, once the
process group exists, builds it straight into its partitions (zero3_load.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from matekd_ds import distributed, models
from matekd_ds.checkpoint import verify_export
from matekd_ds.config import RunConfig, uses_generator
from matekd_ds.data.batching import Encoded, TrainStream, encode
from matekd_ds.data.tasks import TaskData, load_task_data
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.ds_config import resolve_run_ds_configs
from matekd_ds.engines import single_rank_bf16_optimizer
from matekd_ds.errors import MatekdError
from matekd_ds.partition import param_numel
from matekd_ds.run_dir import RunDir


@dataclass(frozen=True)
class Partitioned:
    """A model to be built into its ZeRO-3 partitions after distributed.init()."""

    spec: str  # path, hub id or builtin
    zero3_config: dict[str, Any]  # the DeepSpeed config of its first engine
    shape: torch.nn.Module  # the same model on the meta device: its structure, for the checks


@dataclass(frozen=True)
class RunModels:
    """The models a run starts from. None: not used by this run (teacher for plain ft, the
    generator outside matekd or with matekd.perturbation random), or (student) cut from the
    teacher after its fine-tuning."""

    teacher: torch.nn.Module | Partitioned | None
    student: torch.nn.Module | Partitioned | None
    generator: torch.nn.Module | Partitioned | None
    teacher_is_finetuned: bool  # resuming after the teacher phase: the teacher is this run's export
    generator_is_warm: bool  # resuming after the MLM warm-up: the generator is this run's export


@dataclass(frozen=True)
class Zero3Configs:
    """Per role, the ZeRO-3 DeepSpeed config a model is built into, decided once for the run
    (None: the model is built whole). `first`: for the first engine it goes into (a teacher still
    to be fine-tuned first trains with the student's config). `after_training`: when it is rebuilt
    from its export after training (the fine-tuned teacher for its frozen engine, the warmed
    generator for MATE-KD's generator engine)."""

    first: dict[str, dict[str, Any] | None]
    after_training: dict[str, dict[str, Any] | None]


@dataclass(frozen=True)
class RunInputs:
    cfg: RunConfig
    data: TaskData
    tokenizer: Any
    train: Encoded
    dev: dict[str, Encoded]
    ds_configs: dict[str, dict[str, Any]]  # finalized, per engine (ds_config.resolve_run_ds_configs)
    dtype: str
    zero3: Zero3Configs
    models: RunModels

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def batches_per_epoch(self) -> int:
        """Global micro-batches in one epoch of the training set."""
        return TrainStream(len(self.train), self.cfg.train.micro_batch_size, 0, distributed.world_size(),
                           0).batches_per_epoch


def uses_teacher(cfg: RunConfig) -> bool:
    """Plain fine-tuning needs no teacher, unless the student is cut from one."""
    return cfg.method != "ft" or cfg.models.student_init_from_teacher_layers is not None


def prepare_inputs(cfg: RunConfig, resume: bool) -> RunInputs:
    run = RunDir(cfg.output.dir)
    data = load_task_data(cfg)
    tokenizer = _load_tokenizer(cfg, data, run if resume else None)
    regression = data.spec.is_regression
    train = encode(data.train, tokenizer, cfg.data.max_length, regression)
    dev = {name: encode(rows, tokenizer, cfg.data.max_length, regression) for name, rows in data.dev.items()}
    ds_configs, dtype = resolve_run_ds_configs(cfg, distributed.world_size(), with_teacher=uses_teacher(cfg))
    if dtype == "fp16" and not torch.cuda.is_available():
        raise MatekdError("fp16 training needs a GPU; on the CPU use train.dtype=bf16 or fp32")
    if resume:
        run.check_layout(checkpoint_layout(cfg, ds_configs, dtype, distributed.world_size()))
    resumed = run if resume else None
    finetuned = bool(resumed and cfg.models.teacher_finetune_epochs > 0 and resumed.has_model("teacher"))
    zero3 = zero3_configs(cfg, ds_configs, finetuned)
    run_models = _load_models(cfg, data, tokenizer, resumed, zero3.first, finetuned)
    _check_one_global_batch(cfg, len(train))
    return RunInputs(cfg, data, tokenizer, train, dev, ds_configs, dtype, zero3, run_models)


def checkpoint_layout(cfg: RunConfig, ds_configs: dict[str, dict[str, Any]], dtype: str,
                      world_size: int) -> dict[str, Any]:
    """What a checkpoint of this run can only be resumed with, named as the message refusing a
    change names it: DeepSpeed saves each engine's optimizer state in the precision, ZeRO stage,
    offload and number of partitions it ran with, and its load does not convert between them.
    The trained engines only (teacher fine-tuning and the MLM warm-up train with the student's and
    the generator's configs); the frozen teacher is never checkpointed."""
    layout: dict[str, Any] = {"world size": world_size, "train.dtype": dtype}
    for role in ("student", "generator"):
        zero = ds_configs[role].get("zero_optimization", {}) if role in ds_configs else None
        if zero is None:
            continue
        layout[f"the {role}'s ZeRO stage"] = zero.get("stage", 0)
        for key, what in (("offload_optimizer", "optimizer offload"), ("offload_param", "parameter offload")):
            layout[f"the {role}'s {what}"] = (zero.get(key) or {}).get("device") or "none"
    if world_size == 1:  # it builds ZeRO-1/2 as ZeRO-0 (fp32) or BF16_Optimizer (bf16), whose checkpoints differ
        fast = cfg.deepspeed.single_rank_fast_path
        bf16 = fast and any(single_rank_bf16_optimizer(ds_configs[role]) for role in ("student", "generator")
                            if role in ds_configs)
        # a string, not True: bf16 checkpoints of earlier releases (fast path true, ZeRO-1/2 kept) are refused
        layout["deepspeed.single_rank_fast_path"] = "true (bf16: BF16_Optimizer)" if bf16 else fast
    return layout


def _load_tokenizer(cfg: RunConfig, data: TaskData, resumed: RunDir | None):
    if resumed is not None and resumed.tokenizer_dir.is_dir():
        return models.load_tokenizer(str(resumed.tokenizer_dir))  # the vocabulary its checkpoints were trained with
    if cfg.models.tokenizer:
        return models.load_tokenizer(cfg.models.tokenizer)
    for role in ("teacher", "student") if uses_teacher(cfg) else ("student",):
        spec = getattr(cfg.models, role)
        if not models.is_builtin(spec):
            return models.load_tokenizer(spec, role=role)
    return train_wordpiece(data.texts, cfg.models.builtin_tokenizer_vocab_size)


def zero3_configs(cfg: RunConfig, ds_configs: dict[str, dict[str, Any]], teacher_finetuned: bool) -> Zero3Configs:
    """Which models are built into ZeRO-3 partitions, and with which config, before and after
    their own training (`teacher_finetuned`: a resumed run whose teacher phase is done)."""
    def stage3(ds: dict[str, Any] | None) -> dict[str, Any] | None:
        return ds if ds is not None and ds.get("zero_optimization", {}).get("stage") == 3 else None

    after = {"teacher": ds_configs.get("teacher"), "student": stage3(ds_configs["student"]),
             "generator": stage3(ds_configs.get("generator"))}
    finetune_first = cfg.models.teacher_finetune_epochs > 0 and not teacher_finetuned
    first = dict(after, teacher=stage3(ds_configs["student"]) if finetune_first else after["teacher"])
    return Zero3Configs(first, after)


def _load_models(cfg: RunConfig, data: TaskData, tokenizer, resumed: RunDir | None,
                 zero3: dict[str, dict[str, Any] | None], finetuned: bool) -> RunModels:
    """Teacher, student and generator, checked to share one vocabulary. A resumed run whose
    teacher fine-tuning (or generator warm-up) finished loads that phase's export instead."""
    num_labels, regression = data.spec.num_labels, data.spec.is_regression
    warm = bool(resumed and cfg.matekd.generator_mlm_warmup_steps > 0 and resumed.has_model("generator_warm"))
    teacher = student = generator = None
    if uses_teacher(cfg):
        teacher_spec = str(resumed.model_dir("teacher")) if finetuned else cfg.models.teacher
        teacher = _classifier(cfg, "teacher", teacher_spec, num_labels, tokenizer, regression, zero3["teacher"])
    if cfg.models.student_init_from_teacher_layers is None:
        student = _classifier(cfg, "student", cfg.models.student, num_labels, tokenizer, regression, zero3["student"])
    else:
        models.check_student_layers(structure(teacher).config, cfg.models.student_init_from_teacher_layers)
    if uses_generator(cfg):
        generator_spec = str(resumed.model_dir("generator_warm")) if warm else cfg.models.generator
        generator = _generator(cfg, generator_spec, tokenizer, zero3["generator"])
        # an unsupported MLM head is refused now, not after the teacher phase
        models.masked_lm_parts(structure(generator))
        _check_generator_layers(cfg, generator)
        _check_adversary_probe(cfg, generator)
        if cfg.method == "kd-aug" and isinstance(generator, Partitioned):
            raise MatekdError("method kd-aug keeps its frozen generator whole on every rank: use deepspeed.generator "
                              "below ZeRO-3")
    loaded = {role: structure(m) for role, m in (("teacher", teacher), ("student", student), ("generator", generator))
              if m is not None}
    models.check_shared_vocabulary(loaded, tokenizer)
    if not cfg.models.tokenizer:
        shipped = {"student": cfg.models.student}
        if generator is not None:
            shipped["generator"] = cfg.models.generator
        models.check_tokenizers_agree(shipped, tokenizer)
    models.check_input_length(loaded, cfg.data.max_length)
    return RunModels(teacher, student, generator, teacher_is_finetuned=finetuned, generator_is_warm=warm)


def _check_generator_layers(cfg: RunConfig, generator: torch.nn.Module | Partitioned) -> None:
    keep = cfg.matekd.generator_layers
    if keep is None:
        return
    if isinstance(generator, Partitioned):
        raise MatekdError("matekd.generator_layers cuts a generator built whole: use deepspeed.generator below ZeRO-3")
    models.check_generator_layers(generator, keep)


def _check_adversary_probe(cfg: RunConfig, generator: torch.nn.Module | Partitioned) -> None:
    if cfg.matekd.adversary_probe and isinstance(generator, Partitioned):
        raise MatekdError("matekd.adversary_probe keeps a whole copy of the generator: use deepspeed.generator "
                          "below ZeRO-3")


def structure(model: torch.nn.Module | Partitioned) -> torch.nn.Module:
    """The module to check: the model itself, or a partitioned one's meta-device copy."""
    return model.shape if isinstance(model, Partitioned) else model


def _classifier(cfg: RunConfig, role: str, spec: str, num_labels: int, tokenizer, regression: bool,
                zero3: dict[str, Any] | None) -> torch.nn.Module | Partitioned:
    verify_export(spec)  # an export of this project (this run's teacher/, say) is checked against its manifest
    if zero3 is None:
        with _model_seed(cfg, role):
            return models.load_classifier(role, spec, num_labels, tokenizer, regression)
    config = models.classifier_config(role, spec, num_labels, tokenizer, regression)
    with torch.device("meta"):
        return Partitioned(spec, zero3, models.AutoModelForSequenceClassification.from_config(config))


def _generator(cfg: RunConfig, spec: str, tokenizer, zero3: dict[str, Any] | None) -> torch.nn.Module | Partitioned:
    verify_export(spec)
    if zero3 is None:
        with _model_seed(cfg, "generator"):
            return models.load_generator(spec, tokenizer)
    config = models.generator_config(spec, tokenizer)
    with torch.device("meta"):
        return Partitioned(spec, zero3, models.AutoModelForMaskedLM.from_config(config))


def build_partitioned_models(inputs: RunInputs) -> RunInputs:
    """Build every `Partitioned` model into its ZeRO-3 partitions (collective: after
    distributed.init(), every rank). A failure on any rank stops every rank with one line."""
    cfg, data, m = inputs.cfg, inputs.data, inputs.models
    built: dict[str, torch.nn.Module] = {}
    problem = None
    try:
        for role in ("teacher", "student", "generator"):
            model = getattr(m, role)
            if not isinstance(model, Partitioned):
                continue
            with _model_seed(cfg, role):
                if role == "generator":
                    built[role] = models.load_generator(model.spec, inputs.tokenizer, zero3_config=model.zero3_config)
                else:
                    built[role] = models.load_classifier(role, model.spec, data.spec.num_labels, inputs.tokenizer,
                                                         data.spec.is_regression, zero3_config=model.zero3_config)
    except MatekdError as err:
        problem = str(err)
    problems = [p for p in distributed.gather_objects(problem) if p]
    if problems:
        raise MatekdError(problems[0])
    if not built:
        return inputs
    return dataclasses.replace(inputs, models=dataclasses.replace(m, **built))


# Each model's random initialisation (a builtin model, or the new head of a pretrained encoder)
# comes from (seed, role) alone: the same whether or not another model was loaded from disk first.
_MODEL_SEED_OFFSETS = {"teacher": 101, "student": 202, "generator": 303}


@contextlib.contextmanager
def _model_seed(cfg: RunConfig, role: str):
    state = torch.get_rng_state()
    torch.manual_seed((cfg.train.seed * 1_000_003 + _MODEL_SEED_OFFSETS[role]) % (1 << 31))
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _check_one_global_batch(cfg: RunConfig, train_size: int) -> None:
    world = distributed.world_size()
    if train_size < world * cfg.train.micro_batch_size:
        raise MatekdError(
            f"the training set has {train_size} examples, fewer than one global micro-batch "
            f"({world} ranks x train.micro_batch_size {cfg.train.micro_batch_size})"
        )


def estimated_output_bytes(inputs: RunInputs) -> int:
    """About what a run writes at most: its checkpoints (weights, fp32 master copy and two Adam
    moments per trained parameter, keep_checkpoints + 1 of them while a new one is written) and
    its exports."""
    def numel(model) -> int:
        return param_numel(structure(model)) if model is not None else 0

    cfg, m = inputs.cfg, inputs.models
    student = numel(m.student) or numel(m.teacher)  # cut from the teacher: at most its size
    kept = cfg.output.keep_checkpoints + 1
    student_phase = 16 * (student + numel(m.generator)) * kept
    teacher_phase = 16 * numel(m.teacher) * kept if cfg.models.teacher_finetune_epochs > 0 else 0
    exports = 4 * (2 * student + numel(m.teacher) + numel(m.generator))
    return student_phase + teacher_phase + exports
