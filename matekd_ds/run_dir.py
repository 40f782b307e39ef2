"""The run directory: the one reader and writer of its layout, used by the pipeline, `matekd eval`,
the experiment runner and the quality scripts.

    config.yaml            the resolved run config
    metrics.json           status, teacher and student metrics, evaluations, throughput, memory
    tokenizer/             the tokenizer the run trained with (a resume keeps it)
    teacher/               the teacher, when the run fine-tuned it
    generator_warm/        the generator after its MLM warm-up, when the run did one
    student/, student_best/  the exported student (save_pretrained + tokenizer)
    checkpoints/<phase>/   DeepSpeed checkpoints and loop state (checkpoint.py)
    logs/                  train.log, scalars.csv, tensorboard/
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from matekd_ds import distributed
from matekd_ds.checkpoint import write_atomic
from matekd_ds.config import RunConfig, dump_config, read_config_file
from matekd_ds.errors import MatekdError
from matekd_ds.partition import gathered_state_dict, is_partitioned

# Keys whose change makes a checkpoint meaningless: a resume must keep them.
RESUME_LOCKED = ("task", "method", "models", "data")


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


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- where things are

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def model_dir(self, name: str) -> Path:
        """"student", "student_best", "teacher" or "generator_warm"."""
        return self.path / name

    def has_model(self, name: str) -> bool:
        return (self.model_dir(name) / "config.json").is_file()

    def checkpoints(self, phase: str) -> Path:
        return self.path / "checkpoints" / phase

    def is_run(self) -> bool:
        """A run directory with a finished student export (what `matekd eval RUN` scores)."""
        return self.config_file.is_file() and self.has_model("student")

    # -- reading

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, or {} when there is none yet (or it is being replaced)."""
        try:
            return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def status(self) -> str | None:
        return self.read_metrics().get("status")

    def read_config(self) -> dict[str, Any]:
        return read_config_file(self.config_file)

    # -- writing (rank 0 writes; every rank may call)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        if distributed.is_main():
            write_atomic(self.metrics_file, json.dumps(metrics, indent=2))

    def export(self, name: str, module: torch.nn.Module, tokenizer) -> None:
        export_model(module, tokenizer, self.model_dir(name))

    def check(self, cfg: RunConfig, resume: bool) -> None:
        """Before anything is written: every rank checks, before the ranks rendezvous."""
        if not (self.path.exists() and any(self.path.iterdir())):
            return
        if resume and self.config_file.is_file():
            saved = self.read_config()
            current = cfg.to_dict()
            for key in RESUME_LOCKED:
                if saved.get(key) != current[key]:
                    raise MatekdError(f"--resume: '{key}' differs from the run in {self.path}; "
                                      f"a checkpoint only resumes with the same {key}")
        elif not cfg.output.overwrite:
            raise MatekdError(
                f"output directory {self.path} already holds files; pass --resume to continue that run "
                "or output.overwrite=true to move it aside"
            )

    def open(self, cfg: RunConfig, resume: bool, tokenizer) -> None:
        """Create (or, resuming, reuse) the directory; write config.yaml and the tokenizer.
        Collective: call after distributed.init()."""
        if distributed.is_main():
            fresh = not (resume and self.config_file.is_file())
            if fresh and self.path.exists() and any(self.path.iterdir()):
                # output.overwrite: never delete a user's trained model; move the old run aside.
                aside = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                self.path.rename(aside)
                print(f"[matekd] moved the previous run aside to {aside}")
            self.logs.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.config_file)
            if not self.tokenizer_dir.exists():
                tokenizer.save_pretrained(self.tokenizer_dir)
        distributed.barrier()
