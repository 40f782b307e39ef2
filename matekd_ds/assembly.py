"""One assembly for a run: the engines and the method of each training phase, built from the
run's inputs. `matekd train` (phases.py), the tests and the benchmarks build through this module
and nowhere else, so what they exercise and time is what ships.

    run_inputs(cfg)                             what a run reads, and its ZeRO-3 models built
                                                (a process group of one if none exists)
    build_teacher_finetuning(inputs, engines, model)    ft on the teacher's engine
    build_generator_warmup(inputs, engines, model)      the generator's MLM warm-up
    build_run(inputs, teacher=, generator=)     the student phase: its engines (with the run's
                                                step budgets) and its method, ft, kd or matekd
"""

from __future__ import annotations

from functools import partial

from torch import nn

from matekd_ds import distributed, models
from matekd_ds.adversary import AdversaryProbe, frozen_copy
from matekd_ds.config import RunConfig
from matekd_ds.engines import TORCH_DTYPES, RunEngines
from matekd_ds.inputs import RunInputs, build_partitioned_models, prepare_inputs
from matekd_ds.losses import divergence
from matekd_ds.methods import FineTune, KnowledgeDistillation, MateKD, Method, MlmWarmup
from matekd_ds.partition import gathered_state_dict, is_partitioned
from matekd_ds.perturb import Perturber, RandomTokens
from matekd_ds.teacher import Teacher


def run_inputs(cfg: RunConfig) -> RunInputs:
    """A fresh run's inputs with every ZeRO-3 model built into its partitions, for callers that
    build a run without the pipeline around it (tests, benchmarks). Joins the process group the
    launcher started, or makes a world of one."""
    inputs = prepare_inputs(cfg, resume=False)
    distributed.init()
    return build_partitioned_models(inputs)


def run_engines(inputs: RunInputs) -> RunEngines:
    return RunEngines(inputs.cfg, inputs.ds_configs, inputs.dtype, inputs.batches_per_epoch)


def build_teacher_finetuning(inputs: RunInputs, engines: RunEngines, model: nn.Module) -> FineTune:
    """Fine-tuning the teacher on the labels (method ft, on the teacher's own engine)."""
    return FineTune(engines.teacher_finetune(model), inputs.data.spec.is_regression, role="teacher")


def build_generator_warmup(inputs: RunInputs, engines: RunEngines, model: nn.Module) -> MlmWarmup:
    return MlmWarmup(engines.generator_warmup(model), Perturber.for_run(inputs.cfg.matekd, inputs.tokenizer))


def build_run(inputs: RunInputs, teacher: Teacher | None = None,
              generator: nn.Module | None = None) -> tuple[RunEngines, Method]:
    """The student phase: its engines and its method (`cfg.method`), as `matekd train` trains it.

    `teacher`: the frozen teacher when the teacher phase already made it, else frozen here from
    inputs.models.teacher; `generator`: the warmed generator when a warm-up made one, else
    inputs.models.generator (None: matekd.perturbation random, which has none). The student is
    inputs.models.student, or cut from the teacher."""
    engines, device = run_engines(inputs), distributed.device()
    if teacher is None and inputs.models.teacher is not None:
        teacher = engines.frozen_teacher(inputs.models.teacher, device)
    generator = generator if generator is not None else inputs.models.generator
    student = inputs.models.student if inputs.models.student is not None else cut_student(inputs, teacher.module)
    return engines, _student_method(inputs, engines, student, teacher, generator)


def _student_method(inputs: RunInputs, engines: RunEngines, student: nn.Module, teacher: Teacher | None,
                    generator: nn.Module | None) -> Method:
    cfg, regression = inputs.cfg, inputs.data.spec.is_regression
    if teacher is not None and cfg.method != "ft" and cfg.train.cache_teacher_logits:
        teacher = teacher.with_cached_clean_logits(inputs.train, cfg.eval.batch_size, inputs.pad_id,
                                                   distributed.device())
    student_engine = engines.student(student)
    frozen_dtype = TORCH_DTYPES.get(cfg.train.frozen_forward_dtype)
    if cfg.method == "ft":
        return FineTune(student_engine, regression)
    if cfg.method == "kd":
        return KnowledgeDistillation(student_engine, teacher, regression, cfg.kd.alpha, cfg.kd.temperature,
                                     frozen_dtype=frozen_dtype)
    m = cfg.matekd
    perturber = Perturber.for_run(m, inputs.tokenizer)
    settings = dict(regression=regression, temperature=m.temperature, loss_weights=m.loss_weights,
                    generator_steps=m.generator_steps, student_steps=m.student_steps, frozen_dtype=frozen_dtype)
    if m.perturbation == "random":  # the control arm: no generator, no generator engine
        return MateKD(student_engine, None, teacher, perturber, random_tokens=RandomTokens.for_run(inputs.tokenizer),
                      **settings)
    if m.generator_layers is not None:
        generator = models.keep_first_layers(generator, m.generator_layers)
    if cfg.method == "kd-aug":  # the generator rewrites, never trains: no engine, no optimizer state
        return MateKD(student_engine, None, teacher, perturber,
                      frozen_generator=engines.frozen_generator(generator, distributed.device()), **settings)
    warm = frozen_copy(generator) if m.adversary_probe else None  # before its engine trains it
    generator_engine = engines.generator(generator)
    probe = None
    if warm is not None:
        probe = AdversaryProbe.for_run(cfg, inputs.train, inputs.pad_id, warm, generator_engine.module, perturber,
                                       teacher, partial(divergence, temperature=m.temperature, regression=regression),
                                       frozen_dtype)
    return MateKD(student_engine, generator_engine, teacher, perturber, probe=probe, **settings)


def cut_student(inputs: RunInputs, teacher: nn.Module) -> nn.Module:
    """DistilBERT-style (models.student_init_from_teacher_layers): the teacher's embeddings, head
    and chosen layers. A ZeRO-3 teacher holds partitions only: the weights the student takes are
    gathered (CPU, every rank, one module at a time); the layers it does not take never are."""
    layers = inputs.cfg.models.student_init_from_teacher_layers
    full = None
    if is_partitioned(teacher):
        full = gathered_state_dict(teacher, rank0_only=False,
                                   keep=lambda key: models.teacher_key_in_student(key, layers))
    student = models.init_student_from_teacher(teacher, layers, state_dict=full).float()
    student.requires_grad_(True)
    return student
