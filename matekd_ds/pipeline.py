"""A whole run, in order (`matekd train`; every rank runs it):

  1. check the run directory: its path, --resume, what is already there    RunDir.check
  2. load and check everything the run reads                               inputs.prepare_inputs
  3. start the process group; build the ZeRO-3 models into their partitions
  4. lock and open the run directory (config.yaml, tokenizer/)              RunDir.lock, RunDir.open
  5. teacher: fine-tune (if asked), freeze, score                          phases.teacher_phase
  6. generator: MLM warm-up (if asked)                                     phases.generator_warmup_phase
  7. student: ft / kd / matekd, export                                     phases.student_phase
  8. deployment: student vs teacher size and CPU latency (rank 0)          deployment.for_run
  9. metrics.json, assembled here from what the phases returned

Bad input stops at step 1 or 2 with one line, before DeepSpeed starts and before anything is
written. metrics.json is written after every phase, so a run that ends early records how far it
got and why: "interrupted" (a stop signal, Ctrl-C), "diverged" (a non-finite loss, gradient or
parameter: the last checkpoint is the last finite one), or "failed" (any other error; on a full
disk too: the space the run directory kept aside, RunDir.keep_reserve, is freed for that write).
When the run ends, however it ends, its lock is removed.
Between the steps the run's callbacks (callbacks.py) may stop it: a stop signal, or a fault the
recovery tests inject.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from matekd_ds import deployment, distributed, signals
from matekd_ds.assembly import run_engines
from matekd_ds.callbacks import Callbacks, RunCallback
from matekd_ds.config import RunConfig, augments
from matekd_ds.errors import MatekdError
from matekd_ds.health import Diverged
from matekd_ds.inputs import (
    RunInputs,
    build_partitioned_models,
    checkpoint_layout,
    estimated_output_bytes,
    prepare_inputs,
)
from matekd_ds.kernels import backend_info
from matekd_ds.monitor import Monitor, log, setup_logging
from matekd_ds.phases import (
    GeneratorOutcome,
    PhaseContext,
    StudentOutcome,
    TeacherOutcome,
    generator_warmup_phase,
    student_phase,
    teacher_phase,
)
from matekd_ds.run_dir import RunDir


def run_training(cfg: RunConfig, resume: bool = False, generator_only: bool = False,
                 callbacks: Sequence[RunCallback] = ()) -> dict[str, Any]:
    """Train as `cfg` says; returns what it wrote to metrics.json. `generator_only` (`matekd
    warmup-generator`) stops after the generator's MLM warm-up: one warmed generator, exported
    to <run>/generator_warm, can then serve many MATE-KD runs (models.generator=that path).
    `callbacks` run before the run's own stop-signal handling (callbacks.py)."""
    hooks = Callbacks([*callbacks, signals.StopOnSignal()])
    signals.install()
    setup_logging(None)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with ours
    started = time.time()
    run, inputs = open_run(cfg, resume, hooks)
    try:
        metrics = _train_phases(run, inputs, hooks, resume, generator_only)
        metrics.update(status="completed", wall_seconds=time.time() - started)
        run.release_reserve()  # its space is the run's again: the end is recorded now
        run.write_metrics(metrics)
        refresh_cards(run)  # the exports' model cards, now with the final dev metrics
        distributed.barrier()
    finally:
        run.unlock()
    return metrics


def _train_phases(run: RunDir, inputs: RunInputs, hooks: Callbacks, resume: bool,
                  generator_only: bool) -> dict[str, Any]:
    """Steps 5-7, with metrics.json after each; a run that ends early records why (record_end)."""
    cfg = inputs.cfg
    setup_logging(run.logs / "train.log")
    log.info(f"task {inputs.data.spec.name}: {len(inputs.train)} train examples, "
             + ", ".join(f"{k} {len(v)}" for k, v in inputs.dev.items()) + f"; method {cfg.method}; "
             f"dtype {inputs.dtype}; {distributed.world_size()} rank(s); run directory {run.path}")
    metrics = start_metrics(cfg, inputs.data.spec, inputs.dtype)
    monitor = None
    try:
        monitor = Monitor(run.logs, cfg.logging.csv, cfg.logging.tensorboard)
        ctx = PhaseContext(inputs, run_engines(inputs), run, monitor, hooks, resume,
                           previous=run.read_metrics() if resume else {})
        run.write_metrics(metrics)
        hooks.boundary("opened")
        teacher = teacher_phase(ctx)
        metrics.update(teacher_metrics(teacher))
        run.write_metrics(metrics)
        hooks.boundary("teacher")
        generator = generator_warmup_phase(ctx)
        metrics.update(generator_metrics(generator))
        run.write_metrics(metrics)
        if not generator_only:
            hooks.boundary("warmup")
            student = student_phase(ctx, teacher.teacher, generator.generator)
            metrics.update(student_metrics(student, teacher))
            metrics.update(deployment_metrics(run, inputs, metrics))
    except BaseException as err:  # the checkpoints stay; say why the run ended, then re-raise
        _close(monitor)
        record_end(run, metrics, err)
        raise
    _close(monitor)
    return metrics


def _close(monitor: Monitor | None) -> None:
    """Best effort: on a full disk the scalar log's last lines are lost, not the run's outcome."""
    try:
        if monitor is not None:
            monitor.close()
    except OSError as err:
        log.warning(f"could not finish the scalar log: {err.strerror or err}")


def open_run(cfg: RunConfig, resume: bool, hooks: Callbacks) -> tuple[RunDir, RunInputs]:
    """Steps 1-4: every check before anything is written, then the process group, the ZeRO-3
    models and the run directory."""
    run = RunDir(cfg.output.dir)
    run.check(cfg, resume)
    inputs = prepare_inputs(cfg, resume)
    if not resume:
        run.check_space(estimated_output_bytes(inputs))
    hooks.boundary("loaded")
    distributed.init()  # after every input check: bad input exits before any rank waits on another
    torch.manual_seed(cfg.train.seed + distributed.rank())  # per-rank dropout (each phase reseeds too)
    run.check_shared()
    inputs = build_partitioned_models(inputs)  # ZeRO-3 models, straight into their partitions
    run.lock()
    try:
        run.open(cfg, resume, inputs.tokenizer,
                 checkpoint_layout(cfg, inputs.ds_configs, inputs.dtype, distributed.world_size()))
    except BaseException:
        run.unlock()
        raise
    return run, inputs


# ---------------------------------------------------------------------------------------------
# metrics.json, from what the phases returned


def end_status(err: BaseException) -> str:
    if isinstance(err, (signals.StopRequested, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(err, Diverged):
        return "diverged"
    return "failed"


def record_end(run: RunDir, metrics: dict[str, Any], err: BaseException) -> None:
    """metrics.json says how and why the run ended early, written into the space the run kept
    aside, so a full disk is recorded too. Best effort: on a read-only disk this write fails as
    well, and the original error is the one to report."""
    run.release_reserve()
    try:
        run.write_metrics(dict(metrics, status=end_status(err), reason=f"{type(err).__name__}: {err}"))
    except OSError as write_error:
        log.warning(f"could not record the run's end in {run.metrics_file}: {write_error.strerror or write_error}")


def refresh_cards(run: RunDir) -> None:
    """Best effort: the run is complete; on a full or read-only disk only its cards are stale."""
    try:
        run.refresh_cards()
    except OSError as err:
        log.warning(f"could not update the model card: {err.strerror or err}")


def start_metrics(cfg: RunConfig, spec, dtype: str) -> dict[str, Any]:
    arm = {"perturbation": cfg.matekd.perturbation} if augments(cfg) else {}  # generator or random
    return {"status": "running", "task": spec.name, "method": cfg.method, **arm, "metric": spec.main_metric,
            "world_size": distributed.world_size(), "dtype": dtype,
            "kernels": backend_info()}  # which Triton (or torch) kernels ran


def teacher_metrics(outcome: TeacherOutcome) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if outcome.finetune is not None:
        out["teacher_finetune"] = outcome.finetune
    if outcome.scores is not None:
        out["teacher"] = outcome.scores
        out["memory"] = {"teacher": outcome.memory}
    return out


def deployment_metrics(run: RunDir, inputs: RunInputs, metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json "deployment": rank 0 times the exported student against its teacher on the
    CPU (deployment.py) while the other ranks wait at the end of the run. A failure costs the
    numbers, not the run."""
    if not distributed.is_main():
        return {}
    try:
        record = deployment.for_run(run.path, inputs.cfg, inputs.tokenizer, metrics)
    except (MatekdError, OSError, RuntimeError, ValueError) as err:
        log.warning(f"[deployment] not measured: {err}")
        return {}
    log.info(f"[deployment] {deployment.headline(record)}")
    return {"deployment": record}


def generator_metrics(outcome: GeneratorOutcome) -> dict[str, Any]:
    return {"generator_warmup": outcome.warmup} if outcome.warmup is not None else {}


def student_metrics(outcome: StudentOutcome, teacher: TeacherOutcome) -> dict[str, Any]:
    state = outcome.state
    seconds = max(state.train_seconds, 1e-9)
    memory = {"teacher": teacher.memory} if teacher.memory is not None else {}
    adversary = {"adversary": outcome.adversary} if outcome.adversary is not None else {}
    return {
        "student": {"params": outcome.params, "steps": state.step},
        "memory": {**memory, **outcome.memory},
        "final": state.evaluations[-1]["dev"],
        "best": state.best,
        "evaluations": state.evaluations,
        "throughput": {"samples_per_s": state.samples / seconds, "tokens_per_s": state.tokens / seconds,
                       "train_seconds": state.train_seconds},
        **adversary,
    }
