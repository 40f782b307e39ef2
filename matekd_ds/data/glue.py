"""Registry of the nine GLUE tasks: text fields, label order, metrics and where the data lives."""

from __future__ import annotations

import re
from dataclasses import dataclass

from matekd_ds.errors import MatekdError

GLUE_HUB_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task.

    ``label_names`` follows the integer order of the hub's ``label`` column, so a class id
    means the same thing whether the data came from the hub or from the GLUE TSV download.
    """

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None = regression
    metrics: tuple[str, ...]
    main_metric: str
    hub_config: str
    dev_splits: tuple[str, ...]
    tsv_dir_names: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"),
                 ("matthews",), "matthews", "cola", ("validation",), ("CoLA",)),
        TaskSpec("sst2", ("sentence",), ("negative", "positive"),
                 ("accuracy",), "accuracy", "sst2", ("validation",), ("SST-2",)),
        TaskSpec("mrpc", _PAIR, ("not_equivalent", "equivalent"),
                 ("accuracy", "f1"), "f1", "mrpc", ("validation",), ("MRPC",)),
        TaskSpec("stsb", _PAIR, None,
                 ("pearson", "spearman"), "pearson", "stsb", ("validation",), ("STS-B",)),
        TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("accuracy", "f1"), "accuracy", "qqp", ("validation",), ("QQP",)),
        TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), "accuracy", "mnli",
                 ("validation_matched", "validation_mismatched"), ("MNLI",)),
        TaskSpec("qnli", ("question", "sentence"), _NLI,
                 ("accuracy",), "accuracy", "qnli", ("validation",), ("QNLI",)),
        TaskSpec("rte", _PAIR, _NLI,
                 ("accuracy",), "accuracy", "rte", ("validation",), ("RTE",)),
        # WNLI's hub order is the reverse of RTE/QNLI: 0 = not_entailment, 1 = entailment.
        TaskSpec("wnli", _PAIR, ("not_entailment", "entailment"),
                 ("accuracy",), "accuracy", "wnli", ("validation",), ("WNLI",)),
    )
}


def _normalize_task_name(name: str) -> str:
    # "SST-2", "Sst_2", " sst 2 " and "sst2" all mean the same task.
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_task(name: str) -> TaskSpec:
    """Look up a GLUE task by name, ignoring case and punctuation ("STS-B" == "stsb")."""
    if not isinstance(name, str):
        raise MatekdError(f"GLUE task name must be a string, got {name!r}")
    spec = GLUE_TASKS.get(_normalize_task_name(name))
    if spec is None:
        valid = ", ".join(GLUE_TASKS)
        raise MatekdError(f"unknown GLUE task {name!r}; valid tasks: {valid}")
    return spec
