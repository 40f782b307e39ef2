"""A whole run, in order (`matekd train`; every rank runs it):

  1. inputs    load and check everything the run reads          inputs.prepare_inputs
  2. run dir   check it, start the process group, lock, open    run_dir.RunDir
  3. teacher   fine-tune (if asked), freeze, score              phases.teacher_phase
  4. generator MLM warm-up (if asked)                           phases.generator_warmup_phase
  5. student   ft / kd / matekd, export                         phases.student_phase
  6. metrics.json, assembled here from what the phases returned

Bad input stops at step 1 or 2 with one line, before DeepSpeed starts and before anything is
written. metrics.json is written after every phase, so a run that ends early records how far it
got and why: "interrupted" (a stop signal, Ctrl-C), "diverged" (a non-finite loss, gradient or
parameter: the last checkpoint is the last finite one), or "failed" (any other error, a full disk).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from matekd_ds import distributed, faults, signals
from matekd_ds.config import RunConfig
from matekd_ds.engines import RunEngines
from matekd_ds.health import Diverged
from matekd_ds.inputs import build_partitioned_models, estimated_output_bytes, prepare_inputs
from matekd_ds.kernels import backend_info
from matekd_ds.monitor import Monitor, log, setup_logging
from matekd_ds.phases import (
    GeneratorOutcome, PhaseContext, StudentOutcome, TeacherOutcome, generator_warmup_phase, student_phase,
    teacher_phase,
)
from matekd_ds.run_dir import RunDir


def run_training(cfg: RunConfig, resume: bool = False, generator_only: bool = False) -> dict[str, Any]:
    """Train as `cfg` says; returns what it wrote to metrics.json. `generator_only` (`matekd
    warmup-generator`) stops after the generator's MLM warm-up: one warmed generator, exported
    to <run>/generator_warm, can then serve many MATE-KD runs (models.generator=that path)."""
    signals.install()
    setup_logging(None)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with ours
    started = time.time()
    run = RunDir(cfg.output.dir)
    run.check(cfg, resume)
    inputs = prepare_inputs(cfg, resume)
    if not resume:
        run.check_space(estimated_output_bytes(inputs))
    faults.at("loaded")
    signals.stop_here("before the run started (nothing was written)", collective=False)
    distributed.init()  # after every input check: bad input exits before any rank waits on another
    torch.manual_seed(cfg.train.seed + distributed.rank())  # per-rank dropout (each phase reseeds too)
    run.check_shared()
    inputs = build_partitioned_models(inputs)  # ZeRO-3 models, straight into their partitions
    run.lock()
    run.open(cfg, resume, inputs.tokenizer)
    faults.at("opened")
    setup_logging(run.logs / "train.log")
    previous = run.read_metrics() if resume else {}
    monitor = Monitor(run.logs, cfg.logging.csv, cfg.logging.tensorboard)
    engines = RunEngines(cfg, inputs.ds_configs, inputs.dtype, inputs.batches_per_epoch)
    ctx = PhaseContext(inputs, engines, run, monitor, resume, previous)

    spec = inputs.data.spec
    metrics: dict[str, Any] = {"status": "running", "task": spec.name, "method": cfg.method,
                               "metric": spec.main_metric, "world_size": distributed.world_size(), "dtype": inputs.dtype,
                               "kernels": backend_info()}  # which Triton (or torch) kernels ran
    run.write_metrics(metrics)
    log.info(f"task {spec.name}: {len(inputs.train)} train examples, "
             + ", ".join(f"{k} {len(v)}" for k, v in inputs.dev.items()) + f"; method {cfg.method}; dtype {inputs.dtype}; "
             f"{distributed.world_size()} rank(s); run directory {run.path}")
    try:
        signals.stop_here("before the teacher phase")
        teacher = teacher_phase(ctx)
        metrics.update(teacher_metrics(teacher))
        run.write_metrics(metrics)
        faults.at("teacher")
        signals.stop_here("after the teacher phase")
        generator = generator_warmup_phase(ctx)
        metrics.update(generator_metrics(generator))
        run.write_metrics(metrics)
        if generator_only:
            metrics.update(status="completed", wall_seconds=time.time() - started)
            run.write_metrics(metrics)
            return metrics
        faults.at("warmup")
        signals.stop_here("after the generator warm-up")
        student = student_phase(ctx, teacher.teacher, generator.generator)
    except BaseException as err:  # the checkpoints stay; say why the run ended, then re-raise
        record_end(run, metrics, err)
        raise
    finally:
        monitor.close()
    metrics.update(student_metrics(student, teacher))
    metrics.update(status="completed", wall_seconds=time.time() - started)
    run.write_metrics(metrics)
    distributed.barrier()
    return metrics


# ---------------------------------------------------------------------------------------------
# metrics.json, from what the phases returned


def end_status(err: BaseException) -> str:
    if isinstance(err, (signals.StopRequested, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(err, Diverged):
        return "diverged"
    return "failed"


def record_end(run: RunDir, metrics: dict[str, Any], err: BaseException) -> None:
    """metrics.json says how and why the run ended early. Best effort: on a full or read-only
    disk this write fails too, and the original error is the one to report."""
    try:
        run.write_metrics(dict(metrics, status=end_status(err), reason=f"{type(err).__name__}: {err}"))
    except OSError:
        pass


def teacher_metrics(outcome: TeacherOutcome) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if outcome.finetune is not None:
        out["teacher_finetune"] = outcome.finetune
    if outcome.scores is not None:
        out["teacher"] = outcome.scores
        out["memory"] = {"teacher": outcome.memory}
    return out


def generator_metrics(outcome: GeneratorOutcome) -> dict[str, Any]:
    return {"generator_warmup": outcome.warmup} if outcome.warmup is not None else {}


def student_metrics(outcome: StudentOutcome, teacher: TeacherOutcome) -> dict[str, Any]:
    state = outcome.state
    seconds = max(state.train_seconds, 1e-9)
    memory = {"teacher": teacher.memory} if teacher.memory is not None else {}
    return {
        "student": {"params": outcome.params, "steps": state.step},
        "memory": {**memory, **outcome.memory},
        "final": state.evaluations[-1]["dev"],
        "best": state.best,
        "evaluations": state.evaluations,
        "throughput": {"samples_per_s": state.samples / seconds, "tokens_per_s": state.tokens / seconds,
                       "train_seconds": state.train_seconds},
    }
