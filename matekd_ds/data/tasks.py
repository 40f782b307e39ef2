"""A run's task: its spec (labels, metrics) and its splits as Examples."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from matekd_ds.config import RunConfig, merge, parse_override, read_config_file
from matekd_ds.data import synthetic
from matekd_ds.data.glue import GLUE_TASKS, TaskSpec, get_task
from matekd_ds.data.loaders import Example, glue_split_names, load_glue, load_table
from matekd_ds.errors import MatekdError
from matekd_ds.metrics import METRIC_NAMES


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: dict[str, list[Example]]  # split name -> examples ("dev", or MNLI's two)

    @property
    def texts(self) -> list[str]:
        return [t for ex in self.train for t in ex.texts]


def synthetic_spec() -> TaskSpec:
    return TaskSpec(
        name="synthetic", text_keys=("sentence",), label_names=synthetic.LABEL_NAMES,
        metrics=("accuracy",), main_metric="accuracy", hub_config="", dev_splits=("validation",),
        tsv_dir_names=(),
    )


def custom_spec(cfg: RunConfig) -> TaskSpec:
    d = cfg.data
    unknown = [m for m in d.metrics if m not in METRIC_NAMES]
    if unknown:
        raise MatekdError(f"data.metrics: unknown metric {unknown[0]!r} (valid: {', '.join(METRIC_NAMES)})")
    if d.main_metric not in d.metrics:
        raise MatekdError(f"data.main_metric '{d.main_metric}' must be one of data.metrics {d.metrics}")
    if not d.regression and not d.label_names:
        raise MatekdError("task: custom needs data.label_names (the classes, in id order) or data.regression: true")
    if not d.regression and len(d.label_names) > 2 and "f1" in d.metrics:
        # f1 is the F1 of class 1 (GLUE's binary F1); on more classes it would hide all the others
        raise MatekdError(f"data.metrics: f1 is the F1 of class 1 of a binary task; this task has "
                          f"{len(d.label_names)} classes: use f1_macro (the mean F1 over classes)")
    return TaskSpec(
        name="custom", text_keys=tuple(d.text_columns),
        label_names=None if d.regression else tuple(d.label_names),
        metrics=tuple(d.metrics), main_metric=d.main_metric, hub_config="",
        dev_splits=("validation",), tsv_dir_names=(),
    )


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The run's task (labels, metrics), without reading any data."""
    if cfg.task == "synthetic":
        return synthetic_spec()
    if cfg.task == "custom":
        return custom_spec(cfg)
    return get_task(cfg.task)


def load_dev_sets(cfg: RunConfig) -> dict[str, list[Example]]:
    """The task's dev split(s), whole (data.max_eval_examples is the caller's to apply), without
    reading the training set: a GLUE folder with only dev files, or a custom task without
    data.train_file, is enough."""
    d, spec = cfg.data, task_spec(cfg)
    if cfg.task == "synthetic":
        return {"dev": synthetic.splits(d.synthetic.train_size, d.synthetic.dev_size, d.synthetic.seed)["dev"]}
    if cfg.task == "custom":
        return {"dev": load_table(d.dev_file, d.text_columns, d.label_column, d.label_names, d.regression,
                                  d.no_header)}
    return {name: load_glue(spec, name, d.path) for name in glue_split_names(spec) if name != "train"}


def _truncate(examples: list[Example], limit: int | None) -> list[Example]:
    return examples if limit is None else examples[:limit]


def load_task_data(cfg: RunConfig) -> TaskData:
    d = cfg.data
    if cfg.task == "synthetic":
        spec = synthetic_spec()
        parts = synthetic.splits(d.synthetic.train_size, d.synthetic.dev_size, d.synthetic.seed)
        train, dev = parts["train"], {"dev": parts["dev"]}
    elif cfg.task == "custom":
        spec = custom_spec(cfg)

        def read(path):
            return load_table(path, d.text_columns, d.label_column, d.label_names, d.regression, d.no_header)

        train, dev = read(d.train_file), {"dev": read(d.dev_file)}
    else:
        spec = get_task(cfg.task)
        dev_names = [name for name in glue_split_names(spec) if name != "train"]
        train = load_glue(spec, "train", d.path)
        dev = {name: load_glue(spec, name, d.path) for name in dev_names}
    train = _truncate(train, d.max_train_examples)
    dev = {name: _truncate(rows, d.max_eval_examples) for name, rows in dev.items()}
    if not train:
        raise MatekdError(f"task {cfg.task}: the training split is empty")
    return TaskData(spec, train, dev)


def glue_task_of_folder(path: str) -> str | None:
    """The GLUE task a folder is named after (`SST-2` -> sst2, `sts_b` -> stsb), else None."""
    name = Path(path).expanduser().absolute().name  # "../glue/SST-2/" and "." name their folder
    try:
        return get_task(name).name
    except MatekdError:
        return None


def with_inferred_task(config: str | None, overrides: list[str]) -> list[str]:
    """`matekd train data.path=../glue/SST-2` names no task: the GLUE folder's name says it (said
    on stderr, and `task=` is added to `overrides`). A data.path whose folder names no GLUE task
    is an error, not the synthetic demo trained beside it. Given a task, nothing changes."""
    given = read_config_file(config) if config else {}
    for text in overrides:
        given = merge(given, parse_override(text))
    data = given.get("data")
    path = data.get("path") if isinstance(data, dict) else None
    if "task" in given or not path:
        return overrides
    task = glue_task_of_folder(str(path))
    if task is None:
        raise MatekdError(f"data.path {path} given without task=; which GLUE task is it? "
                          f"(task={', '.join(GLUE_TASKS)})")
    print(f"[matekd] task={task}, from the name of data.path {path} (task=... says otherwise)", file=sys.stderr)
    return [*overrides, f"task={task}"]
