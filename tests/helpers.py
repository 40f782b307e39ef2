"""Tiny models, tokenizer and engines for in-process tests (one rank, CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

from matekd_ds import distributed, models
from matekd_ds.data import synthetic
from matekd_ds.data.batching import collate, encode
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.engines import EngineSpec, build_engine, finalize_ds_config, prepare_teacher, read_ds_config
from matekd_ds.methods import MateKD
from matekd_ds.methods.common import CleanTeacher
from matekd_ds.perturb import Perturber

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"


def tiny_tokenizer():
    examples = synthetic.generate(300, seed=5)
    return train_wordpiece([t for ex in examples for t in ex.texts], 500), examples


def tiny_batch(tokenizer, examples, n=6):
    data = encode(examples[:n], tokenizer, 32, regression=False)
    return collate(data, list(range(n)), tokenizer.pad_token_id)


def ds_config(stage: int, dtype: str = "fp32", micro_batch: int = 6, clip: float = 5.0):
    return finalize_ds_config(read_ds_config(f"zero{stage}"), micro_batch=micro_batch, grad_accum=1,
                              world_size=1, clip=clip, dtype=dtype, zero_stage=None)


def tiny_matekd(stage: int, tokenizer, generator_lr: float = 1e-3, weights=(1 / 3, 1 / 3, 1 / 3),
                teacher_table: torch.Tensor | None = None) -> MateKD:
    distributed.init()
    torch.manual_seed(0)
    teacher = models.load_classifier("teacher", "builtin:bert-L2-H32-A2", 2, tokenizer, False)
    student = models.load_classifier("student", "builtin:bert-L1-H32-A2", 2, tokenizer, False)
    generator = models.load_generator("builtin:bert-L1-H32-A2", tokenizer)
    student_engine = build_engine(student, EngineSpec("student", ds_config(stage), 1e-3, 0.01, 100))
    generator_engine = build_engine(generator, EngineSpec("generator", ds_config(stage), generator_lr, 0.0, 100,
                                                          schedule="constant"))
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    teacher = CleanTeacher(prepare_teacher(teacher, "fp32", torch.device("cpu")), teacher_table)
    return MateKD(student_engine, generator_engine, teacher, perturber,
                  regression=False, temperature=1.0, loss_weights=list(weights), generator_steps=1, student_steps=1)


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
    snap = {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in engine.module.named_parameters()},
            "optimizer": _clone(engine.optimizer.state_dict()),
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
            timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m matekd_ds ARGS`, or under `deepspeed --num_gpus RANKS --module` (CPU ranks)."""
    import os

    if ranks == 1:
        command = [sys.executable, "-m", "matekd_ds", *args]
    else:
        port = str(distributed._free_port())
        launcher = str(Path(sys.executable).parent / "deepspeed")  # this environment's launcher
        command = [launcher, "--num_gpus", str(ranks), "--master_port", port, "--module", "matekd_ds", *args]
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
