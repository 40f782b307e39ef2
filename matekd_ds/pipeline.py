"""A whole run, in order: check every input, then (optionally) fine-tune the teacher, then train
the student with ft/kd/matekd, export it, and write metrics.json.

Everything that can be wrong with the user's input (config, data, models, DeepSpeed configs) is
checked before the run directory is created, so bad input never leaves a half-written run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from matekd_ds import distributed, models
from matekd_ds.checkpoint import Checkpointer, write_atomic
from matekd_ds.config import RunConfig, dump_config, read_config_file
from matekd_ds.data import TaskData, load_task_data
from matekd_ds.data.batching import Encoded, TrainStream, encode
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.engines import (
    TEACHER_PLAIN, EngineSpec, build_engine, build_teacher_engine, finalize_ds_config, finalize_teacher_ds_config,
    prepare_teacher, read_ds_config, resolve_dtype, steps_from_epochs,
)
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation import evaluate, main_score, predict
from matekd_ds.methods import FineTune, KnowledgeDistillation, MateKD
from matekd_ds.methods.common import CleanTeacher
from matekd_ds.methods.matekd import count_student_steps
from matekd_ds.methods.mlm import MlmWarmup, mlm_evaluate
from matekd_ds.monitor import Monitor, log, setup_logging
from matekd_ds.partition import gathered_state_dict, is_partitioned, param_bytes, param_numel
from matekd_ds.perturb import Perturber
from matekd_ds.trainer import LoopConfig, Trainer

# Keys whose change makes a checkpoint meaningless: a resume must keep them.
RESUME_LOCKED = ("task", "method", "models", "data")
MLM_EVAL_EXAMPLES = 512  # dev examples scored during the generator's MLM warm-up


@dataclass
class Prepared:
    """Everything loaded and checked before the run directory is touched."""

    cfg: RunConfig
    data: TaskData
    tokenizer: Any
    train: Encoded
    dev: dict[str, Encoded]
    ds_configs: dict[str, dict[str, Any]]
    dtype: str
    teacher: torch.nn.Module | None  # None: method ft, no teacher needed
    student: torch.nn.Module | None  # None: initialised from the teacher after its fine-tuning
    generator: torch.nn.Module | None
    teacher_engine: Any = None  # the teacher's ZeRO-3 inference engine (deepspeed.teacher), once built
    memory: dict[str, Any] = field(default_factory=dict)  # per engine: parameter bytes per rank


# ---------------------------------------------------------------------------------------------
# Input checks and loading


def load_run_tokenizer(cfg: RunConfig, data: TaskData, resume: bool):
    saved = Path(cfg.output.dir) / "tokenizer"
    if resume and saved.is_dir():  # a resumed run keeps the vocabulary its checkpoints were trained with
        return models.load_tokenizer(str(saved))
    if cfg.models.tokenizer:
        return models.load_tokenizer(cfg.models.tokenizer)
    for role in ("teacher", "student") if uses_teacher(cfg) else ("student",):
        spec = getattr(cfg.models, role)
        if not models.is_builtin(spec):
            return models.load_tokenizer(spec, role=role)
    return train_wordpiece(data.texts, cfg.models.builtin_tokenizer_vocab_size)


def uses_teacher(cfg: RunConfig) -> bool:
    """Plain fine-tuning needs no teacher, unless the student is cut from one."""
    return cfg.method != "ft" or cfg.models.student_init_from_teacher_layers is not None


def prepare(cfg: RunConfig, resume: bool) -> Prepared:
    data = load_task_data(cfg)
    tokenizer = load_run_tokenizer(cfg, data, resume)
    spec, regression = data.spec, data.spec.is_regression
    train = encode(data.train, tokenizer, cfg.data.max_length, regression)
    dev = {name: encode(rows, tokenizer, cfg.data.max_length, regression) for name, rows in data.dev.items()}

    roles = ["student"] + (["generator"] if cfg.method == "matekd" else [])
    raw = {role: read_ds_config(getattr(cfg.deepspeed, role)) for role in roles}
    dtype = resolve_dtype(cfg.train.dtype, raw)
    world = distributed.world_size()
    clips = {"student": cfg.train.clip, "generator": cfg.matekd.generator_clip}
    ds_configs = {
        role: finalize_ds_config(
            raw[role], micro_batch=cfg.train.micro_batch_size, grad_accum=cfg.train.gradient_accumulation_steps,
            world_size=world, clip=clips[role], dtype=dtype, zero_stage=cfg.train.zero_stage,
            role=role, nvme_path=cfg.deepspeed.nvme_path,
        )
        for role in roles
    }
    if uses_teacher(cfg) and cfg.deepspeed.teacher != TEACHER_PLAIN:  # a ZeRO-3 inference engine
        ds_configs["teacher"] = finalize_teacher_ds_config(
            read_ds_config(cfg.deepspeed.teacher), micro_batch=cfg.eval.batch_size, world_size=world, dtype=dtype,
            nvme_path=cfg.deepspeed.nvme_path,
        )
    if dtype == "fp16" and not torch.cuda.is_available():
        raise MatekdError("fp16 training needs a GPU; on the CPU use train.dtype=bf16 or fp32")

    num_labels = spec.num_labels
    teacher = None
    if uses_teacher(cfg):
        teacher_spec = _finetuned_teacher_path(cfg, resume) or cfg.models.teacher
        teacher = models.load_classifier("teacher", teacher_spec, num_labels, tokenizer, regression)
    student = None
    if cfg.models.student_init_from_teacher_layers is None:
        student = models.load_classifier("student", cfg.models.student, num_labels, tokenizer, regression)
    generator = None
    if cfg.method == "matekd":
        generator = models.load_generator(_warm_generator_path(cfg, resume) or cfg.models.generator, tokenizer)
    checked = {role: m for role, m in (("teacher", teacher), ("student", student), ("generator", generator))
               if m is not None}
    models.check_shared_vocabulary(checked, tokenizer)
    if not cfg.models.tokenizer:
        models.check_tokenizers_agree({"student": cfg.models.student, "generator": cfg.models.generator}, tokenizer)

    batches = TrainStream(len(train), cfg.train.micro_batch_size, 0, world, cfg.train.seed).batches_per_epoch
    if batches == 0:
        raise MatekdError(
            f"the training set has {len(train)} examples, fewer than one global micro-batch "
            f"({world} ranks x train.micro_batch_size {cfg.train.micro_batch_size})"
        )
    return Prepared(cfg, data, tokenizer, train, dev, ds_configs, dtype, teacher, student, generator)


def _finetuned_teacher_path(cfg: RunConfig, resume: bool) -> str | None:
    """A resumed run whose teacher phase already finished loads the exported teacher."""
    path = Path(cfg.output.dir) / "teacher"
    done = resume and cfg.models.teacher_finetune_epochs > 0 and (path / "config.json").is_file()
    return str(path) if done else None


def _warm_generator_path(cfg: RunConfig, resume: bool) -> str | None:
    """A resumed run whose generator warm-up already finished loads the warmed generator."""
    path = Path(cfg.output.dir) / "generator_warm"
    done = resume and cfg.matekd.generator_mlm_warmup_steps > 0 and (path / "config.json").is_file()
    return str(path) if done else None


# ---------------------------------------------------------------------------------------------
# The run directory


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """Every rank checks before any rank writes (init() in between is a rendezvous)."""
    run_dir = Path(cfg.output.dir)
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return
    if resume and (run_dir / "config.yaml").is_file():
        _check_resume_compatible(cfg, read_config_file(run_dir / "config.yaml"))
    elif not cfg.output.overwrite:
        raise MatekdError(
            f"output directory {run_dir} already holds files; pass --resume to continue that run "
            "or output.overwrite=true to move it aside"
        )


def open_run_dir(cfg: RunConfig, resume: bool) -> Path:
    run_dir = Path(cfg.output.dir)
    if distributed.is_main():
        fresh = not (resume and (run_dir / "config.yaml").is_file())
        if fresh and run_dir.exists() and any(run_dir.iterdir()):
            # output.overwrite: never delete a user's trained model; move the old run aside.
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"[matekd] moved the previous run aside to {aside}")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    distributed.barrier()
    return run_dir


def _check_resume_compatible(cfg: RunConfig, saved: dict[str, Any]) -> None:
    current = cfg.to_dict()
    for key in RESUME_LOCKED:
        if saved.get(key) != current[key]:
            raise MatekdError(f"--resume: '{key}' differs from the run in {cfg.output.dir}; a checkpoint only resumes with the same {key}")


def export_model(module: torch.nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained + tokenizer, written beside and renamed into place (rank 0). Every rank
    calls it: a ZeRO-3 module's weights are gathered first (a collective), one layer at a time."""
    state = gathered_state_dict(module) if is_partitioned(module) else None
    if not distributed.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:
        module.save_pretrained(tmp, state_dict=state)
    else:
        module.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    if distributed.is_main():
        write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))


# ---------------------------------------------------------------------------------------------
# Phases


def _loop_config(cfg: RunConfig, phase: str, total_steps: int) -> LoopConfig:
    return LoopConfig(
        phase=phase, total_steps=total_steps, micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.gradient_accumulation_steps, seed=cfg.train.seed,
        eval_every=cfg.eval.every_steps, eval_batch=cfg.eval.batch_size,
        checkpoint_every=cfg.output.checkpoint_every, log_every=cfg.logging.log_every,
        progress=cfg.logging.progress,
    )


def _batches_per_epoch(p: Prepared) -> int:
    return TrainStream(len(p.train), p.cfg.train.micro_batch_size, 0, distributed.world_size(), 0).batches_per_epoch


def finetune_teacher(p: Prepared, run_dir: Path, monitor: Monitor, resume: bool) -> dict[str, Any]:
    cfg = p.cfg
    total = steps_from_epochs(cfg.models.teacher_finetune_epochs, _batches_per_epoch(p), cfg.train.gradient_accumulation_steps)
    engine = build_engine(p.teacher, EngineSpec(
        "teacher", dict(p.ds_configs["student"]), cfg.models.teacher_finetune_lr, cfg.train.weight_decay,
        total, warmup_steps=int(0.1 * total),
    ))
    method = FineTune(engine, p.data.spec.is_regression)
    trainer = Trainer(method, engine.module, p.train, p.dev, p.data.spec, _loop_config(cfg, "teacher", total),
                      Checkpointer(run_dir / "checkpoints" / "teacher", cfg.output.keep_checkpoints), monitor,
                      p.tokenizer.pad_token_id, engine.device)
    log.info(f"[teacher] fine-tuning for {total} steps")
    state = trainer.fit(resume)
    export_model(engine.module, p.tokenizer, run_dir / "teacher")
    p.teacher = _module_after_training(engine, lambda: models.load_classifier(
        "teacher", str(run_dir / "teacher"), p.data.spec.num_labels, p.tokenizer, p.data.spec.is_regression))
    distributed.barrier()
    return {"dev": state.evaluations[-1]["dev"], "best": state.best, "steps": state.step,
            "train_seconds": state.train_seconds}


def clean_teacher(p: Prepared, teacher: torch.nn.Module, device: torch.device) -> CleanTeacher:
    if not p.cfg.train.cache_teacher_logits:
        return CleanTeacher(teacher, engine=p.teacher_engine)
    started = time.perf_counter()
    table = predict(teacher, p.train, p.cfg.eval.batch_size, p.tokenizer.pad_token_id, device)
    log.info(f"[teacher] cached clean logits of {len(p.train)} training examples in {time.perf_counter() - started:.1f}s")
    return CleanTeacher(teacher, torch.from_numpy(table).to(device), engine=p.teacher_engine)


def build_method(p: Prepared, total_steps: int, teacher: CleanTeacher | None):
    cfg, regression = p.cfg, p.data.spec.is_regression
    student_steps = total_steps
    if cfg.method == "matekd":
        student_steps = count_student_steps(total_steps, cfg.matekd.generator_steps, cfg.matekd.student_steps)
    student_engine = build_engine(p.student, EngineSpec(
        "student", p.ds_configs["student"], cfg.train.lr, cfg.train.weight_decay, max(1, student_steps),
        warmup_steps=int(cfg.train.warmup_ratio * student_steps),
    ))
    if cfg.method == "ft":
        return FineTune(student_engine, regression)
    if cfg.method == "kd":
        return KnowledgeDistillation(student_engine, teacher, regression, cfg.kd.alpha, cfg.kd.temperature)
    m = cfg.matekd
    generator_engine = build_engine(p.generator, EngineSpec(
        "generator", p.ds_configs["generator"], m.generator_lr, 0.0,
        max(1, total_steps - student_steps), schedule="constant",
    ))
    perturber = _perturber(p)
    return MateKD(student_engine, generator_engine, teacher, perturber, regression=regression,
                  temperature=m.temperature, loss_weights=m.loss_weights,
                  generator_steps=m.generator_steps, student_steps=m.student_steps)


def _perturber(p: Prepared) -> Perturber:
    m = p.cfg.matekd
    return Perturber(p.tokenizer.all_special_ids, p.tokenizer.mask_token_id, m.mask_prob, m.gumbel_tau)


def warm_up_generator(p: Prepared, run_dir: Path, monitor: Monitor, resume: bool) -> dict[str, Any]:
    """MLM on the task's training text (methods/mlm.py); exports <run>/generator_warm."""
    cfg, steps = p.cfg, p.cfg.matekd.generator_mlm_warmup_steps
    engine = build_engine(p.generator, EngineSpec(
        "generator", dict(p.ds_configs["generator"]), cfg.matekd.generator_mlm_warmup_lr, 0.01, steps,
        warmup_steps=int(0.1 * steps),
    ))
    perturber = _perturber(p)
    dev = next(iter(p.dev.values())).head(MLM_EVAL_EXAMPLES)
    evaluator = lambda: {"dev": mlm_evaluate(engine.module, perturber, dev, cfg.eval.batch_size,  # noqa: E731
                                             p.tokenizer.pad_token_id, engine.device)}
    before = evaluator()["dev"]
    log.info(f"[generator] MLM warm-up for {steps} steps; dev masked-token accuracy before: {before['accuracy']:.4f}")
    trainer = Trainer(MlmWarmup(engine, perturber), engine.module, p.train, p.dev, p.data.spec,
                      _loop_config(cfg, "generator_warmup", steps),
                      Checkpointer(run_dir / "checkpoints" / "generator_warmup", cfg.output.keep_checkpoints),
                      monitor, p.tokenizer.pad_token_id, engine.device, evaluator=evaluator, metric_name="mlm_accuracy")
    state = trainer.fit(resume)
    export_model(engine.module, p.tokenizer, run_dir / "generator_warm")
    p.generator = _module_after_training(engine, lambda: models.load_generator(str(run_dir / "generator_warm"), p.tokenizer))
    distributed.barrier()
    return {"steps": state.step, "dev_before": before, "dev_after": state.evaluations[-1]["dev"]["dev"],
            "train_seconds": state.train_seconds}


def generator_phase(p: Prepared, run_dir: Path, monitor: Monitor, resume: bool, previous: dict[str, Any],
                    metrics: dict[str, Any]) -> None:
    """The generator's MLM warm-up, if asked and not already done by the run being resumed."""
    if p.generator is None or p.cfg.matekd.generator_mlm_warmup_steps == 0:
        return
    if _warm_generator_path(p.cfg, resume) is not None:
        metrics["generator_warmup"] = previous.get("generator_warmup")
        return
    metrics["generator_warmup"] = warm_up_generator(p, run_dir, monitor, resume)


def _module_after_training(engine, reload) -> torch.nn.Module:
    """The trained module, free of its engine. A ZeRO-3 engine leaves only partitions in the
    module (and its hooks on it): the module comes back from its export instead."""
    module = engine.module
    partitioned = is_partitioned(module)
    engine.destroy()
    if partitioned:
        distributed.barrier()  # rank 0 has finished writing the export
        module = reload()
    return module


def _param_count(module: torch.nn.Module) -> int:
    return param_numel(module)


def memory_record(module: torch.nn.Module, ds_config: dict[str, Any] | None) -> dict[str, Any]:
    """Parameter bytes on every rank (a collective), for metrics.json."""
    local = param_bytes(module)
    per_rank = distributed.gather_objects(local["rank_bytes"])
    zero = (ds_config or {}).get("zero_optimization", {})
    offload = {k: zero[k]["device"] for k in ("offload_param", "offload_optimizer") if zero.get(k)}
    return {"zero_stage": zero.get("stage") if ds_config else None, "offload": offload,
            "partitioned": local["partitioned"], "param_bytes_full": local["full_bytes"],
            "param_bytes_per_rank": per_rank, "param_bytes_rank_max": max(per_rank),
            "param_bytes_rank_fraction": max(per_rank) / max(1, local["full_bytes"])}


def teacher_phase(p: Prepared, run_dir: Path, monitor: Monitor, resume: bool, previous: dict[str, Any],
                  metrics: dict[str, Any]) -> torch.nn.Module | None:
    """Fine-tune the teacher if asked, then freeze it and score it on dev."""
    if p.teacher is None:
        return None
    cfg, device = p.cfg, distributed.device()
    if cfg.models.teacher_finetune_epochs > 0 and _finetuned_teacher_path(cfg, resume) is None:
        metrics["teacher_finetune"] = finetune_teacher(p, run_dir, monitor, resume)
    elif "teacher_finetune" in previous:
        metrics["teacher_finetune"] = previous["teacher_finetune"]
    if "teacher" in p.ds_configs:  # deepspeed.teacher: ZeRO-3, partitioned over the ranks
        p.teacher_engine = build_teacher_engine(p.teacher, p.ds_configs["teacher"])
        teacher = p.teacher_engine.module  # called directly: see build_teacher_engine
    else:
        teacher = prepare_teacher(p.teacher, p.dtype, device)
    p.memory["teacher"] = memory_record(teacher, p.ds_configs.get("teacher"))
    teacher_dev = evaluate(teacher, p.dev, p.data.spec, cfg.eval.batch_size, p.tokenizer.pad_token_id, device)
    metrics["teacher"] = {"dev": teacher_dev, "params": _param_count(teacher)}
    metrics["memory"] = p.memory
    log.info(f"[teacher] dev {p.data.spec.main_metric} {main_score(teacher_dev):.4f}; parameters on each rank: "
             f"{p.memory['teacher']['param_bytes_rank_max'] / 2**20:.2f} MiB of {p.memory['teacher']['param_bytes_full'] / 2**20:.2f} MiB")
    return teacher


def student_phase(p: Prepared, teacher: torch.nn.Module | None, run_dir: Path, monitor: Monitor,
                  resume: bool) -> tuple[Any, torch.nn.Module]:
    """Train the student with the configured method; export it; return the loop state."""
    cfg, device = p.cfg, distributed.device()
    if p.student is None:
        # A ZeRO-3 teacher holds partitions only: gather its full weights (CPU, every rank) first.
        full = gathered_state_dict(teacher, rank0_only=False) if is_partitioned(teacher) else None
        p.student = models.init_student_from_teacher(teacher, cfg.models.student_init_from_teacher_layers,
                                                     state_dict=full).float()
        p.student.requires_grad_(True)
    total = cfg.train.max_steps or steps_from_epochs(cfg.train.epochs, _batches_per_epoch(p), cfg.train.gradient_accumulation_steps)
    method = build_method(p, total, clean_teacher(p, teacher, device) if cfg.method != "ft" else None)
    student = method.engines["student"].module
    for role, engine in method.engines.items():
        p.memory[role] = memory_record(engine.module, p.ds_configs[role])
    export_best = lambda: export_model(student, p.tokenizer, run_dir / "student_best")  # noqa: E731
    trainer = Trainer(
        method, student, p.train, p.dev, p.data.spec, _loop_config(cfg, "student", total),
        Checkpointer(run_dir / "checkpoints" / "student", cfg.output.keep_checkpoints), monitor,
        p.tokenizer.pad_token_id, device, on_best=export_best if cfg.eval.save_best else None,
    )
    log.info(f"[student] {cfg.method} for {total} steps")
    state = trainer.fit(resume)
    export_model(student, p.tokenizer, run_dir / "student")
    return state, student


def run_training(cfg: RunConfig, resume: bool = False, generator_only: bool = False) -> dict[str, Any]:
    """The `matekd train` entry point (every rank runs it). `generator_only` (`matekd
    warmup-generator`) stops after the generator's MLM warm-up: one warmed generator, exported
    to <run>/generator_warm, can then serve many MATE-KD runs (models.generator=that path)."""
    setup_logging(None)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with ours
    started = time.time()
    torch.manual_seed(cfg.train.seed)  # the same random init on every rank
    p = prepare(cfg, resume)  # all input checks, before DeepSpeed and the process group start
    check_run_dir(cfg, resume)
    distributed.init()
    torch.manual_seed(cfg.train.seed + distributed.rank())  # per-rank dropout
    run_dir = open_run_dir(cfg, resume)
    previous = _read_metrics(run_dir) if resume else {}
    setup_logging(run_dir / "logs" / "train.log")
    if distributed.is_main() and not (run_dir / "tokenizer").exists():
        p.tokenizer.save_pretrained(run_dir / "tokenizer")
    monitor = Monitor(run_dir / "logs", cfg.logging.csv, cfg.logging.tensorboard)
    metrics: dict[str, Any] = {"status": "running", "task": p.data.spec.name, "method": cfg.method,
                               "metric": p.data.spec.main_metric, "world_size": distributed.world_size(),
                               "dtype": p.dtype}
    write_metrics(run_dir, metrics)
    log.info(f"task {p.data.spec.name}: {len(p.train)} train examples, "
             + ", ".join(f"{k} {len(v)}" for k, v in p.dev.items()) + f"; method {cfg.method}; dtype {p.dtype}; "
             f"{distributed.world_size()} rank(s); run directory {run_dir}")
    try:
        teacher = teacher_phase(p, run_dir, monitor, resume, previous, metrics)
        generator_phase(p, run_dir, monitor, resume, previous, metrics)
        if generator_only:
            metrics.update(status="completed", wall_seconds=time.time() - started)
            write_metrics(run_dir, metrics)
            return metrics
        state, student = student_phase(p, teacher, run_dir, monitor, resume)
    except BaseException as err:  # the checkpoints stay; say why the run ended, then re-raise
        write_metrics(run_dir, dict(metrics, status="interrupted", reason=f"{type(err).__name__}: {err}"))
        raise
    finally:
        monitor.close()
    metrics.update({
        "status": "completed",
        "student": {"params": _param_count(student), "steps": state.step},
        "memory": p.memory,
        "final": state.evaluations[-1]["dev"],
        "best": state.best,
        "evaluations": state.evaluations,
        "throughput": {
            "samples_per_s": state.samples / max(state.train_seconds, 1e-9),
            "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
            "train_seconds": state.train_seconds,
        },
        "wall_seconds": time.time() - started,
    })
    write_metrics(run_dir, metrics)
    distributed.barrier()
    return metrics
