"""The runs of a sweep, in order: per task its teacher and generator, then the students seed by
seed; each with its full run config, validated before anything runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matekd_ds.config import AUGMENTING, config_from_dict, merge
from matekd_ds.errors import MatekdError
from matekd_ds.experiment.spec import base_method, uses_generator
from matekd_ds.run_dir import RunDir


@dataclass
class Run:
    task: str  # the spec's task name (its key in `tasks`); the run config's `task` is in config
    name: str  # "teacher", "generator", or "<method>-seed<k>"
    kind: str  # "teacher", "generator" or "student"
    config: dict[str, Any]
    run_dir: Path
    command: str = "train"  # or "warmup-generator"
    method: str | None = None
    seed: int | None = None
    needs: list[str] = field(default_factory=list)  # names of runs of the same task this one needs
    size: int | None = None  # a student's transfer-set size (spec transfer_sizes), else None

    @property
    def label(self) -> str:
        return f"{self.task}/{self.name}" if self.size is None else f"{self.task}/n{self.size}/{self.name}"

    @property
    def report_task(self) -> str:
        """The report row this run's scores go to: the task, or `<task>@<N>` for a transfer set."""
        return self.task if self.size is None else f"{self.task}@{self.size}"

    def completed(self) -> bool:
        return RunDir(self.run_dir).status() == "completed"


def _models(**values: Any) -> dict[str, Any]:
    return {"models": dict(values)}


def plan(spec: dict[str, Any]) -> list[Run]:
    """Every run of the sweep, each with its full run config, validated before anything runs."""
    out = Path(spec["output_dir"])
    base = spec.get("base") or {}
    method_overrides = spec.get("method_overrides") or {}
    teacher, generator = spec["teacher"], spec.get("generator") or {}
    teacher_data = {"data": (teacher.get("finetune") or {}).get("data") or {}}
    sizes: list[int | None] = sorted(spec.get("transfer_sizes") or []) or [None]
    runs: list[Run] = []
    for task, task_overrides in spec["tasks"].items():
        # the key is the config's task unless the overrides name one (task: custom)
        common = merge(merge(base, {"task": task}), task_overrides or {})
        task_dir = out / task
        finetuned = (teacher.get("finetuned") or {}).get(task)
        needs: list[str] = []
        if finetuned:
            teacher_path = str(finetuned)
        else:
            if not teacher.get("model"):
                raise MatekdError(f"experiment spec: no teacher for task {task} "
                                  f"(teacher.model or teacher.finetuned.{task})")
            teacher_cfg = merge(merge(common, teacher.get("finetune") or {}), {
                "method": "ft", **_models(student=teacher["model"], student_init_from_teacher_layers=None,
                                          teacher_finetune_epochs=0)})
            runs.append(Run(task, "teacher", "teacher", teacher_cfg, task_dir / "teacher"))
            teacher_path = str(RunDir(task_dir / "teacher").model_dir("student_best"))
            needs.append("teacher")
        generator_path = generator.get("model")
        student_needs = list(needs)
        if any(uses_generator(m, spec) for m in spec["methods"]) and generator.get("mlm_warmup"):
            # all the text the teacher saw, not a student's transfer set
            warm_cfg = merge(merge(merge(merge(common, method_overrides.get("matekd") or {}), teacher_data),
                                   generator["mlm_warmup"]), {
                "method": "matekd",
                **_models(teacher=teacher_path, generator=generator_path, teacher_finetune_epochs=0)})
            runs.append(Run(task, "generator", "generator", warm_cfg, task_dir / "generator",
                            command="warmup-generator", needs=list(needs)))
            generator_path = str(RunDir(task_dir / "generator").model_dir("generator_warm"))
        for size in sizes:
            students_dir = task_dir if size is None else task_dir / f"n{size}"
            for name in spec["methods"]:
                method = base_method(name, method_overrides)
                for seed in spec["seeds"]:
                    cfg = merge(merge(common, method_overrides.get(name) or {}), {
                        "method": method, "train": {"seed": seed},
                        **_models(teacher=teacher_path, teacher_finetune_epochs=0,
                                  **({"generator": generator_path} if generator_path else {})),
                    })
                    if method in AUGMENTING:
                        cfg = merge(cfg, {"matekd": {"generator_mlm_warmup_steps": 0}})
                    if size is not None:  # the first N examples: the smaller sets lie inside the larger
                        cfg = merge(cfg, {"data": {"max_train_examples": size}})
                    warmed = uses_generator(name, spec) and generator.get("mlm_warmup")
                    run_needs = student_needs + (["generator"] if warmed else [])
                    runs.append(Run(task, f"{name}-seed{seed}", "student", cfg, students_dir / f"{name}-seed{seed}",
                                    method=name, seed=seed, needs=run_needs, size=size))
    # Preparation first; then seed by seed (smaller transfer sets first), so that a sweep cut
    # short still covers every task.
    order = {seed: i for i, seed in enumerate(spec["seeds"])}
    runs.sort(key=lambda r: (r.kind == "student", order.get(r.seed, -1), r.size or 0))
    for run in runs:
        run.config = merge(run.config, {"output": {"dir": str(run.run_dir)}, "logging": {"progress": False}})
        try:
            config_from_dict(json.loads(json.dumps(run.config)))
        except MatekdError as err:
            raise MatekdError(f"experiment run {run.label}: {err}") from None
    return runs
