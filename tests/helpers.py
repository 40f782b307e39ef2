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
from matekd_ds.assembly import build_run, run_inputs
from matekd_ds.config import RunConfig, load_config
from matekd_ds.data import synthetic
from matekd_ds.data.batching import collate, encode
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.ds_config import finalize_ds_config, finalize_teacher_ds_config, read_ds_config
from matekd_ds.methods import MateKD

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")


def load_benchmark_script(relative: str):
    """A script under benchmarks/ by path (benchmarks/ is not an installed package), registered
    under its file name so that its dataclasses and pickles resolve."""
    path = REPO / "benchmarks" / relative
    if str(path.parent) not in sys.path:  # its own imports (harness, reference_matekd) live beside it
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


# The tiny task every in-process test shares: 300 synthetic sentences (seed 5), a WordPiece
# vocabulary of at most 500 tokens built on them, sequences of at most 32 tokens. tiny_tokenizer()
# and a run config with TINY_TASK build the same tokenizer and the same encoded training rows, so
# tiny_batch's example indices are the run's own (its teacher's clean-logit table applies).
TINY_TASK = ["task=synthetic", "data.synthetic.train_size=300", "data.synthetic.dev_size=50",
             "data.synthetic.seed=5", "data.max_length=32", "models.builtin_tokenizer_vocab_size=500"]


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


def tiny_run_config(*overrides: str) -> RunConfig:
    """MATE-KD on the tiny task with tiny builtin models and a 1:1 cycle, as a run config."""
    return load_config(None, [*TINY_TASK, "method=matekd", "models.teacher=builtin:bert-L2-H32-A2",
                              "models.student=builtin:bert-L1-H32-A2", "models.generator=builtin:bert-L1-H32-A2",
                              "models.teacher_finetune_epochs=0", "train.max_steps=100", "train.lr=1e-3",
                              "matekd.generator_steps=1", "matekd.student_steps=1", *overrides])


def tiny_matekd(stage: int, generator_lr: float = 1e-3, weights=(1 / 3, 1 / 3, 1 / 3),
                zero3_teacher: bool | None = None, micro_batch: int = 6, dtype: str = "fp32",
                generator_preset: str | None = None, overrides: tuple[str, ...] = ()) -> MateKD:
    """MATE-KD as `matekd train` builds it (assembly.build_run): student and generator engines at
    ZeRO `stage`, the teacher a plain frozen module, or (zero3_teacher, the default at stage 3) a
    ZeRO-3 inference engine; `overrides`: more run-config keys."""
    zero3_teacher = stage == 3 if zero3_teacher is None else zero3_teacher
    cfg = tiny_run_config(f"deepspeed.student=zero{stage}", f"deepspeed.generator={generator_preset or f'zero{stage}'}",
                          f"deepspeed.teacher={'teacher-inference' if zero3_teacher else 'none'}",
                          f"train.dtype={dtype}", f"train.micro_batch_size={micro_batch}",
                          f"matekd.generator_lr={generator_lr}", f"matekd.loss_weights={list(weights)}", *overrides)
    _, method = build_run(run_inputs(cfg))
    return method


def soft_inputs_embeds(model, mb, y: torch.Tensor) -> torch.Tensor:
    """The soft input of a generator step computed outside any forward, as inputs_embeds: the
    masked rows of `model`'s looked-up embeddings replaced by y @ E (E = its word embeddings).
    The reference perturb.soft_embeddings is checked against; right only for a whole E (under
    ZeRO-3, E outside its module's forward is an empty placeholder)."""
    embedding = model.get_input_embeddings()
    rows = y.to(embedding.weight.dtype) @ embedding.weight
    return embedding(mb.input_ids).masked_scatter(mb.mask.unsqueeze(-1), rows)


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


def matekd_in_process(capfd, *args) -> tuple[int, str, str]:
    """`matekd ARGS` in this process: (exit code, stdout, stderr). The process group it joins is
    kept: the CLI leaves it at exit, and in a test process that would leave DeepSpeed's cached
    groups pointing at a destroyed group for every in-process test after it ("Group ... is not
    registered")."""
    from unittest import mock

    from matekd_ds import cli

    capfd.readouterr()
    with mock.patch.object(cli, "_leave_process_group", lambda code: None):
        code = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err
