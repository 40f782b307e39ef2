"""Tiny models, tokenizer and engines for in-process tests (one rank, CPU)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from matekd_ds import distributed, models
from matekd_ds.data import synthetic
from matekd_ds.data.batching import collate, encode
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.ds_config import finalize_ds_config, finalize_teacher_ds_config, read_ds_config
from matekd_ds.engines import EngineSpec, build_engine, build_teacher_engine, place_frozen_teacher
from matekd_ds.methods import MateKD
from matekd_ds.perturb import Perturber
from matekd_ds.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")


def load_benchmark_script(relative: str):
    """A script under benchmarks/ by path (benchmarks/ is not an installed package), registered
    under its file name so that its dataclasses and pickles resolve."""
    path = REPO / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


def tiny_tokenizer():
    examples = synthetic.generate(300, seed=5)
    return train_wordpiece([t for ex in examples for t in ex.texts], 500), examples


def tiny_batch(tokenizer, examples, n=6):
    data = encode(examples[:n], tokenizer, 32, regression=False)
    return collate(data, list(range(n)), tokenizer.pad_token_id)


def ds_config(stage: int, dtype: str = "fp32", micro_batch: int = 6, clip: float = 5.0, preset: str | None = None):
    return finalize_ds_config(read_ds_config(preset or f"zero{stage}"), micro_batch=micro_batch, grad_accum=1,
                              world_size=distributed.world_size(), clip=clip, dtype=dtype, zero_stage=None)


def teacher_ds_config(dtype: str = "fp32", micro_batch: int = 6, preset: str = "teacher-inference"):
    return finalize_teacher_ds_config(read_ds_config(preset), micro_batch=micro_batch,
                                      world_size=distributed.world_size(), dtype=dtype)


def tiny_models(tokenizer):
    torch.manual_seed(0)
    return {"teacher": models.load_classifier("teacher", "builtin:bert-L2-H32-A2", 2, tokenizer, False),
            "student": models.load_classifier("student", "builtin:bert-L1-H32-A2", 2, tokenizer, False),
            "generator": models.load_generator("builtin:bert-L1-H32-A2", tokenizer)}


def tiny_matekd(stage: int, tokenizer, generator_lr: float = 1e-3, weights=(1 / 3, 1 / 3, 1 / 3),
                teacher_table: torch.Tensor | None = None, zero3_teacher: bool | None = None,
                built: dict | None = None, micro_batch: int = 6, dtype: str = "fp32",
                generator_preset: str | None = None) -> MateKD:
    """Student and generator engines at ZeRO `stage`; the teacher a plain frozen module, or
    (zero3_teacher, the default at stage 3) a ZeRO-3 inference engine."""
    distributed.init()
    built = built or tiny_models(tokenizer)
    config = ds_config(stage, dtype=dtype, micro_batch=micro_batch)
    student_engine = build_engine(built["student"], EngineSpec("student", config, 1e-3, 0.01, 100))
    generator_config = ds_config(stage, dtype=dtype, micro_batch=micro_batch, preset=generator_preset)
    generator_engine = build_engine(built["generator"], EngineSpec("generator", generator_config, generator_lr, 0.0,
                                                                   100, schedule="constant"))
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    if (stage == 3) if zero3_teacher is None else zero3_teacher:
        teacher_engine = build_teacher_engine(built["teacher"], teacher_ds_config(dtype, micro_batch=micro_batch))
        teacher = Teacher(teacher_engine.module, engine=teacher_engine, clean_table=teacher_table)
    else:
        teacher = Teacher(place_frozen_teacher(built["teacher"], dtype, torch.device("cpu")), clean_table=teacher_table)
    return MateKD(student_engine, generator_engine, teacher, perturber,
                  regression=False, temperature=1.0, loss_weights=list(weights), generator_steps=1, student_steps=1)


def param_tensors(module) -> dict:
    """Each parameter's values on this rank, copied: the ZeRO-3 partition when partitioned."""
    return {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for n, p in module.named_parameters()}


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot_engine(engine) -> dict:
    """Every parameter, gradient and optimizer-state tensor of an engine, copied."""
    snap = {"params": param_tensors(engine.module),
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in engine.module.named_parameters()},
            "optimizer": _clone(engine.optimizer.state_dict()),
            # ZeRO keeps (partitioned) gradients in flat buffers of its own, not in .grad
            "zero_grads": {k: _clone(getattr(engine.optimizer, k, None))
                           for k in ("averaged_gradients", "grad_partitions_flat_buffer")},
            "scheduler": _clone(engine.lr_scheduler.state_dict()),
            "global_steps": engine.global_steps}
    return snap


def assert_same(a, b, path="") -> None:
    """Bit-identical comparison of nested dicts/lists of tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path} keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__") and type(a) is type(b):  # e.g. DeepSpeed's loss scaler
        assert_same(vars(a), vars(b), path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_cli(args: list[str], cwd: Path, env: dict | None = None, ranks: int = 1,
            timeout: int = 600, launcher: str = "deepspeed", script: Path | None = None,
            script_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m matekd_ds ARGS`, or under `deepspeed --num_gpus RANKS --module` (CPU ranks), or
    (launcher="torchrun") `torchrun --nproc_per_node RANKS -m`. `script`: run that file instead."""
    target = [str(script), *(script_args or [])] if script else ["matekd_ds", *args]
    if ranks == 1 and launcher == "deepspeed":
        command = [sys.executable, *(target if script else ["-m", *target])]
    elif launcher == "torchrun":
        port = str(distributed._free_port())
        command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks),
                   "--master_port", port, *(target if script else ["-m", *target])]
    else:
        port = str(distributed._free_port())
        ds = str(Path(sys.executable).parent / "deepspeed")  # this environment's launcher
        command = [ds, "--num_gpus", str(ranks), "--master_port", port, *(target if script else ["--module", *target])]
    if ranks > 1:  # as torchrun does: one OpenMP thread per CPU rank, or 2 ranks x 2 threads fight over 2 cores
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)), **(env or {})}
    return subprocess.run(command, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def child_env(extra: dict | None = None) -> dict:
    """This process's environment without the launcher variables. An in-process test may have
    called distributed.init(), which sets RANK/MASTER_PORT... here (and holds that port): a child
    must form its own world, not try to join that one."""
    import os

    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **(extra or {})}


def run_launcher(script: str, args: list[str], cwd: Path, env: dict | None = None,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    """One of launch/'s wrappers (bash launch/deepspeed.sh ARGS ...), with this environment's
    python, deepspeed and torchrun first on PATH and a free MASTER_PORT."""
    import os

    bin_dir = str(Path(sys.executable).parent)
    full_env = child_env({"MASTER_PORT": str(distributed._free_port()), "OMP_NUM_THREADS": "1",
                          "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(env or {})})
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
