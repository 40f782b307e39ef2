"""The phases of a run, in run order. Each takes what it needs and returns what it made:

  teacher_phase            fine-tune the teacher (if asked), freeze it, score it    -> TeacherOutcome
  generator_warmup_phase   MLM warm-up of the generator on the task's text (if asked) -> GeneratorOutcome
  student_phase            train the student with ft, kd or matekd; export it       -> StudentOutcome

A phase that trains runs a Trainer over the Method that assembly.py builds for it, checkpoints
under checkpoints/<phase>/ and exports its model into the run directory. pipeline.py runs them in
turn and writes metrics.json from what they return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from matekd_ds import distributed, models
from matekd_ds.assembly import build_generator_warmup, build_run, build_teacher_finetuning
from matekd_ds.callbacks import Callbacks
from matekd_ds.checkpoint import Checkpointer
from matekd_ds.config import augments
from matekd_ds.engines import RunEngines
from matekd_ds.evaluation import DevEvaluator, evaluate, main_score
from matekd_ds.inputs import RunInputs
from matekd_ds.methods import Method
from matekd_ds.methods.mlm import MlmEvaluator
from matekd_ds.monitor import Monitor, log
from matekd_ds.partition import is_partitioned, memory_record, param_numel
from matekd_ds.run_dir import RunDir
from matekd_ds.teacher import Teacher
from matekd_ds.trainer import LoopConfig, LoopState, Trainer

MLM_EVAL_EXAMPLES = 512  # dev examples scored during the generator's MLM warm-up


@dataclass(frozen=True)
class PhaseContext:
    """What every phase shares: the run's inputs, its engines, its directory, its scalar log,
    its callbacks, and whether this invocation resumes an earlier one (and what that one
    recorded)."""

    inputs: RunInputs
    engines: RunEngines
    run: RunDir
    monitor: Monitor
    callbacks: Callbacks
    resume: bool
    previous: dict[str, Any]  # the resumed run's metrics.json ({} for a fresh run)

    def trainer(self, method: Method, phase: str, total_steps: int, evaluator, device: torch.device,
                on_best: Callable[[], None] | None = None) -> Trainer:
        cfg = self.inputs.cfg
        return Trainer(method, self.inputs.train, self.inputs.pad_id, device,
                       LoopConfig.of_run(cfg, phase, total_steps, self.inputs.dtype), evaluator,
                       Checkpointer(self.run.checkpoints(phase), cfg.output.keep_checkpoints), self.monitor,
                       self.callbacks, on_best)

    def dev_evaluator(self, model: torch.nn.Module, device: torch.device) -> DevEvaluator:
        return DevEvaluator(model, self.inputs.dev, self.inputs.data.spec, self.inputs.cfg.eval.batch_size,
                            self.inputs.pad_id, device)


def _module_after_training(engine, reload: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The trained module, free of its engine. A ZeRO-3 engine leaves only partitions in the
    module (and its hooks on it): the module comes back from its export instead."""
    module = engine.module
    partitioned = is_partitioned(module)
    engine.destroy()
    if partitioned:
        distributed.barrier()  # rank 0 has finished writing the export
        module = reload()
    return module


# ---------------------------------------------------------------------------------------------
# 1. The teacher


@dataclass(frozen=True)
class TeacherOutcome:
    teacher: Teacher | None  # None: this run needs no teacher (plain ft)
    scores: dict[str, Any] | None  # metrics.json "teacher": dev metrics and parameter count
    finetune: dict[str, Any] | None  # metrics.json "teacher_finetune", when this run fine-tuned it
    memory: dict[str, Any] | None  # its parameter bytes per rank


def teacher_phase(ctx: PhaseContext) -> TeacherOutcome:
    """Fine-tune the teacher if asked (and not already done by the run being resumed), then
    freeze it (a plain module, or a ZeRO-3 inference engine) and score it on dev."""
    inputs = ctx.inputs
    model = inputs.models.teacher
    if model is None:
        return TeacherOutcome(None, None, None, None)
    finetune = ctx.previous.get("teacher_finetune")
    if inputs.cfg.models.teacher_finetune_epochs > 0 and not inputs.models.teacher_is_finetuned:
        model, finetune = _fine_tune_teacher(ctx, model)
    device = distributed.device()
    teacher = ctx.engines.frozen_teacher(model, device)
    memory = memory_record(teacher.module, ctx.engines.ds_configs.get("teacher"))
    spec = inputs.data.spec
    dev = evaluate(teacher.module, inputs.dev, spec, inputs.cfg.eval.batch_size, inputs.pad_id, device)
    log.info(f"[teacher] dev {spec.main_metric} {main_score(dev):.4f}; parameters on each rank: "
             f"{memory['param_bytes_rank_max'] / 2**20:.2f} MiB of {memory['param_bytes_full'] / 2**20:.2f} MiB")
    return TeacherOutcome(teacher, {"dev": dev, "params": param_numel(teacher.module)}, finetune, memory)


def _fine_tune_teacher(ctx: PhaseContext, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    inputs = ctx.inputs
    spec, total = inputs.data.spec, ctx.engines.teacher_finetune_steps
    method = build_teacher_finetuning(inputs, ctx.engines, model)
    engine = method.engines["teacher"]
    trainer = ctx.trainer(method, "teacher", total, ctx.dev_evaluator(engine.module, engine.device), engine.device)
    log.info(f"[teacher] fine-tuning for {total} steps")
    state = trainer.fit(ctx.resume)
    ctx.run.export("teacher", engine.module, inputs.tokenizer)
    # a ZeRO-3 engine leaves partitions only: the teacher comes back from its export, straight
    # into the partitions of its frozen engine when that is ZeRO-3 too
    model = _module_after_training(engine, lambda: models.load_classifier(
        "teacher", str(ctx.run.model_dir("teacher")), spec.num_labels, inputs.tokenizer, spec.is_regression,
        zero3_config=inputs.zero3.after_training["teacher"]))
    distributed.barrier()
    return model, {"dev": state.evaluations[-1]["dev"], "best": state.best, "steps": state.step,
                   "train_seconds": state.train_seconds}


# ---------------------------------------------------------------------------------------------
# 2. The generator's MLM warm-up


@dataclass(frozen=True)
class GeneratorOutcome:
    generator: torch.nn.Module | None  # None: the method is not matekd
    warmup: dict[str, Any] | None  # metrics.json "generator_warmup", when the run warmed it up


def generator_warmup_phase(ctx: PhaseContext) -> GeneratorOutcome:
    """MLM on the task's training text (methods/mlm.py), if asked and not already done by the
    run being resumed; the warmed generator is exported to <run>/generator_warm."""
    inputs = ctx.inputs
    generator, steps = inputs.models.generator, inputs.cfg.matekd.generator_mlm_warmup_steps
    if generator is None or steps == 0:
        return GeneratorOutcome(generator, None)
    if inputs.models.generator_is_warm:
        return GeneratorOutcome(generator, ctx.previous.get("generator_warmup"))
    method = build_generator_warmup(inputs, ctx.engines, generator)
    engine = method.engines["generator"]
    dev = next(iter(inputs.dev.values())).head(MLM_EVAL_EXAMPLES)
    evaluator = MlmEvaluator(engine.module, method.perturber, dev, inputs.cfg.eval.batch_size, inputs.pad_id,
                             engine.device)
    before = evaluator()["dev"]
    log.info(f"[generator] MLM warm-up for {steps} steps; dev masked-token accuracy before: {before['accuracy']:.4f}")
    state = ctx.trainer(method, "generator_warmup", steps, evaluator, engine.device).fit(ctx.resume)
    ctx.run.export("generator_warm", engine.module, inputs.tokenizer)
    generator = _module_after_training(engine, lambda: models.load_generator(
        str(ctx.run.model_dir("generator_warm")), inputs.tokenizer,
        zero3_config=inputs.zero3.after_training["generator"]))
    distributed.barrier()
    return GeneratorOutcome(generator, {"steps": state.step, "dev_before": before,
                                        "dev_after": state.evaluations[-1]["dev"]["dev"],
                                        "train_seconds": state.train_seconds})


# ---------------------------------------------------------------------------------------------
# 3. The student


@dataclass(frozen=True)
class StudentOutcome:
    state: LoopState  # steps, evaluations, best, throughput counters
    params: int
    memory: dict[str, dict[str, Any]]  # per trained engine: parameter bytes per rank
    adversary: list[dict[str, Any]] | None = None  # matekd.adversary_probe: one record per generator phase


def student_phase(ctx: PhaseContext, teacher: Teacher | None, generator: torch.nn.Module | None) -> StudentOutcome:
    """Train the student with the run's method, exporting student_best/ at every new best
    evaluation and student/ at the end."""
    inputs, cfg, device = ctx.inputs, ctx.inputs.cfg, distributed.device()
    _, method = build_run(inputs, teacher=teacher, generator=generator)
    student = method.engines["student"].module
    memory = {role: memory_record(engine.module, ctx.engines.ds_configs[role])
              for role, engine in method.engines.items()}
    total = ctx.engines.student_phase_steps
    on_best = partial(ctx.run.export, "student_best", student, inputs.tokenizer) if cfg.eval.save_best else None
    trainer = ctx.trainer(method, "student", total, ctx.dev_evaluator(student, device), device, on_best)
    arm = " (random tokens, no generator)" if augments(cfg) and cfg.matekd.perturbation == "random" else ""
    if cfg.method == "kd-aug" and not arm:
        arm = " (the warmed generator frozen: masked-LM augmentation)"
    log.info(f"[student] {cfg.method} for {total} steps{arm}")
    state = trainer.fit(ctx.resume)
    ctx.run.export("student", student, inputs.tokenizer)
    return StudentOutcome(state, param_numel(student), memory, getattr(method, "adversary_records", None))
