"""`matekd predict MODEL --glue-test DIR --out SUBMISSION`: the GLUE leaderboard's files for the
model's task, from the test split(s) of a GLUE-format folder (the GLUE download: a GLUE root with
`SST-2/test.tsv`, `MNLI/test_matched.tsv`, ..., `diagnostic/diagnostic.tsv`, or one task folder).

The rules followed (gluebenchmark.com's submission format, as the GLUE authors' own jiant writes
it): one TSV per test set, named `CoLA.tsv`, `SST-2.tsv`, `MRPC.tsv`, `STS-B.tsv`, `QQP.tsv`,
`MNLI-m.tsv`, `MNLI-mm.tsv`, `QNLI.tsv`, `RTE.tsv`, `WNLI.tsv` and `AX.tsv` (the diagnostic set,
predicted by the MNLI model); a header `index<TAB>prediction`; one row per test example, in the
test file's order, with that example's `index` (QQP: `id`); predictions in each task's label
vocabulary of the GLUE download: `entailment`/`not_entailment` for RTE and QNLI,
`entailment`/`neutral`/`contradiction` for MNLI and AX, `0`/`1` for CoLA, SST-2, MRPC, QQP and
WNLI (1 = acceptable, positive, equivalent, duplicate, entailment), a score in [0, 5] with three
decimals for STS-B. The leaderboard wants all eleven files (one zip); run this once per task
into the same --out folder.

Each test file is checked first against the GLUE download's: its columns, in order, and its
row count (the leaderboard's test sets have fixed sizes), so another task's test file or a dev
file is refused rather than written as a submission. `--force` accepts another row count (a
deliberate subset); the columns are still checked.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from matekd_ds import distributed
from matekd_ds.config import RunConfig
from matekd_ds.data.glue import TaskSpec
from matekd_ds.data.sources import Rows, column_choices, first_line_fields, read_source
from matekd_ds.durable import fsync_path, write_atomic
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation_cli import encode_rows, load_target
from matekd_ds.metrics import predictions_from_outputs
from matekd_ds.predict import score

# task -> the (submission file, test split) pairs it predicts
SUBMISSION_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "cola": (("CoLA.tsv", "test"),),
    "sst2": (("SST-2.tsv", "test"),),
    "mrpc": (("MRPC.tsv", "test"),),
    "stsb": (("STS-B.tsv", "test"),),
    "qqp": (("QQP.tsv", "test"),),
    "mnli": (("MNLI-m.tsv", "test_matched"), ("MNLI-mm.tsv", "test_mismatched"), ("AX.tsv", "diagnostic")),
    "qnli": (("QNLI.tsv", "test"),),
    "rte": (("RTE.tsv", "test"),),
    "wnli": (("WNLI.tsv", "test"),),
}
ALL_FILES = tuple(name for files in SUBMISSION_FILES.values() for name, _ in files)
TEXT_LABEL_TASKS = ("mnli", "qnli", "rte")  # the others' GLUE files label classes 0/1
HEADER = "index\tprediction\n"
_PAIR = ("index", "sentence1", "sentence2")
_MNLI = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
         "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")
# submission file -> the GLUE download's test file: its columns, in order, and its row count
TEST_FORMATS: dict[str, tuple[tuple[str, ...], int]] = {
    "CoLA.tsv": (("index", "sentence"), 1063),
    "SST-2.tsv": (("index", "sentence"), 1821),
    "MRPC.tsv": (("index", "#1 ID", "#2 ID", "#1 String", "#2 String"), 1725),
    "STS-B.tsv": (("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"),
                  1379),
    "QQP.tsv": (("id", "question1", "question2"), 390965),
    "MNLI-m.tsv": (_MNLI, 9796),
    "MNLI-mm.tsv": (_MNLI, 9847),
    "AX.tsv": (_PAIR, 1104),
    "QNLI.tsv": (("index", "question", "sentence"), 5463),
    "RTE.tsv": (_PAIR, 3000),
    "WNLI.tsv": (_PAIR, 146),
}
OPTIONAL_SPLITS = ("diagnostic",)  # AX: written when the folder has it, else said on stderr


def test_file_candidates(spec: TaskSpec, directory: Path, split: str) -> list[Path]:
    if split == "diagnostic":  # the GLUE download keeps it beside the task folders
        return [directory / "diagnostic" / "diagnostic.tsv", directory / "AX" / "test.tsv",
                directory / "diagnostic.tsv", directory.parent / "diagnostic" / "diagnostic.tsv"]
    name = f"{split}.tsv"
    return [directory / name, *(directory / sub / name for sub in (*spec.tsv_dir_names, spec.hub_config))]


def find_test_file(spec: TaskSpec, directory: Path, split: str) -> Path | None:
    return next((p for p in test_file_candidates(spec, directory, split) if p.is_file()), None)


def prediction_texts(spec: TaskSpec, outputs: np.ndarray) -> list[str]:
    """Each output in the task's GLUE label vocabulary."""
    predictions = predictions_from_outputs(spec, outputs)
    if spec.is_regression:
        return [f"{min(max(float(v), 0.0), 5.0):.3f}" for v in predictions]
    if spec.name in TEXT_LABEL_TASKS:
        return [spec.label_names[int(c)] for c in predictions]
    return [str(int(c)) for c in predictions]


def submission_text(ids: list[str], predictions: list[str]) -> str:
    return HEADER + "".join(f"{i}\t{p}\n" for i, p in zip(ids, predictions))


@dataclass
class SubmissionRequest:
    target: str
    test_dir: Path
    out: Path
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    force: bool = False  # test files of another size than GLUE's (a deliberate subset)


@dataclass(frozen=True)
class TestSet:
    file_name: str
    path: Path
    rows: Rows


def _test_set_name(file_name: str) -> str:
    return f"GLUE's {file_name.removesuffix('.tsv')} test set"


def _looks_like(columns: tuple[str, ...], rows: int | None = None) -> str:
    """", it looks like QNLI's test file" when exactly those columns (and rows) are another's."""
    alike = [name.removesuffix(".tsv") for name, (cols, n) in TEST_FORMATS.items()
             if cols == columns and rows in (None, n)]
    return f" (it looks like {' or '.join(alike)}'s test file)" if alike else ""


def check_test_columns(file_name: str, path: Path) -> None:
    """The test file has the GLUE download's columns for `file_name`, in order."""
    expected = TEST_FORMATS[file_name][0]
    found = tuple(first_line_fields(path))
    if found != expected:
        raise MatekdError(f"--glue-test: {path} has columns [{', '.join(found)}], {_test_set_name(file_name)} has "
                          f"[{', '.join(expected)}]{_looks_like(found)}")


def check_test_rows(file_name: str, path: Path, rows: int, force: bool) -> None:
    """The test file has all of GLUE's test examples (the leaderboard scores every one)."""
    expected = TEST_FORMATS[file_name][1]
    if rows != expected and not force:
        raise MatekdError(f"--glue-test: {path} has {rows} rows, {_test_set_name(file_name)} has {expected}"
                          f"{_looks_like(TEST_FORMATS[file_name][0], rows)}; --force writes from a subset anyway")


def _test_sets(spec: TaskSpec, test_dir: Path, force: bool = False) -> list[TestSet]:
    if spec.name not in SUBMISSION_FILES:
        raise MatekdError(f"--glue-test: the model's task is {spec.name}, not a GLUE task")
    if not test_dir.is_dir():
        raise MatekdError(f"--glue-test {test_dir}: no such folder")
    choices = column_choices(spec, None)
    sets = []
    for file_name, split in SUBMISSION_FILES[spec.name]:
        path = find_test_file(spec, test_dir, split)
        if path is None:
            if split in OPTIONAL_SPLITS:
                if distributed.is_main():
                    print(f"[matekd] {file_name} not written: no diagnostic/diagnostic.tsv in {test_dir}",
                          file=sys.stderr)
                continue
            tried = ", ".join(str(p) for p in test_file_candidates(spec, test_dir, split))
            raise MatekdError(f"--glue-test: no {spec.name} {split} file; looked for: {tried}")
        check_test_columns(file_name, path)
        rows = read_source(str(path), spec, choices, labeled=False)[0]
        check_test_rows(file_name, path, len(rows.ids), force)
        sets.append(TestSet(file_name, path, rows))
    return sets


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MatekdError(f"--out {out} is a file; --glue-test writes a folder")
    parent = out.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MatekdError(f"--out {out}: the folder {parent} does not exist or is not writable")


def write_files(out: Path, files: dict[str, str]) -> None:
    """Each file whole or absent (durable.write_atomic), in `out`, created when it does not
    exist. Other tasks' files already there stay."""
    if not out.is_dir():
        out.mkdir()
        fsync_path(out.parent)  # the new folder's entry survives a power loss too
    for name, text in files.items():
        write_atomic(out / name, text)


def _checked_test_sets(request: SubmissionRequest, cfg: RunConfig, spec: TaskSpec) -> list[TestSet]:
    _check_out_dir(request.out)
    return _test_sets(spec, request.test_dir, request.force)


def write_submission(request: SubmissionRequest) -> dict[str, Any] | None:
    """Predict every test set of the model's task and write its leaderboard file(s) (rank 0)."""
    loaded = load_target(request.target, request.config, request.overrides, partial(_checked_test_sets, request))
    sets, spec, cfg = loaded.data, loaded.spec, loaded.cfg
    encoded = {s.file_name: encode_rows(loaded, s.rows.examples) for s in sets}
    distributed.init()  # after every input check
    files = {}
    for test in sets:
        outputs = score(loaded.model, encoded[test.file_name], cfg.eval.batch_size, loaded.tokenizer.pad_token_id)
        files[test.file_name] = submission_text(test.rows.ids, prediction_texts(spec, outputs))
    if not distributed.is_main():
        return None
    write_files(request.out, files)
    present = [name for name in ALL_FILES if (request.out / name).is_file()]
    return {"model": loaded.target.model, "task": spec.name, "out": str(request.out),
            "written": {s.file_name: {"from": str(s.path), "rows": len(s.rows.ids),
                                      "glue_rows": TEST_FORMATS[s.file_name][1]} for s in sets},
            "forced": request.force,
            "submission_files": present, "missing_for_a_full_submission": [n for n in ALL_FILES if n not in present]}
