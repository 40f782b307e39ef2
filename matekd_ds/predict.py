"""`matekd predict MODEL --data FILE --out PATH`: label a file, labeled or not.

Batched and sharded over ranks when launched by `deepspeed` (each rank scores 1/N of the rows;
rank 0 writes). Per example: its id (the row's `id`/`idx`/`index`/`guid` column, `--id-column`,
else its 0-based row number), the predicted class name (regression: the score) and every class's
probability. The output's suffix chooses the format: `.tsv`, `.csv` or `.jsonl`; it is written
beside and renamed into place (durable.write_atomic), so it is complete or absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matekd_ds import distributed
from matekd_ds.config import RunConfig
from matekd_ds.data.batching import Encoded
from matekd_ds.data.glue import TaskSpec
from matekd_ds.data.sources import Rows, column_choices, read_source
from matekd_ds.durable import write_atomic
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation import predict as model_outputs
from matekd_ds.evaluation_cli import encode_rows, load_target, reads_headerless, run_columns

OUTPUT_FORMATS = (".tsv", ".csv", ".jsonl")


@dataclass
class PredictRequest:
    target: str
    data: str
    out: Path
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    text_columns: list[str] | None = None
    id_column: str | None = None
    no_header: bool = False  # a CSV/TSV file without a header line: columns by number


def check_output_path(out: Path, suffixes: tuple[str, ...] = OUTPUT_FORMATS, flag: str = "--out") -> None:
    """Before any work: a known format, a folder that exists and is writable, not a folder."""
    if suffixes and out.suffix.lower() not in suffixes:
        raise MatekdError(f"{flag} {out}: unknown format {out.suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(suffixes)}")
    if out.is_dir():
        raise MatekdError(f"{flag} {out} is a directory; give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise MatekdError(f"{flag} {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MatekdError(f"{flag} {out}: the folder {parent} is not writable")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def prediction_records(spec: TaskSpec, ids: list[str], outputs: np.ndarray) -> list[dict[str, Any]]:
    """{"id", "label", "probabilities": {class: p}} per example, or {"id", "score"} (regression)."""
    if spec.is_regression:
        return [{"id": i, "score": float(v)} for i, v in zip(ids, outputs.reshape(len(ids), -1)[:, 0])]
    probabilities = softmax(outputs)
    names = spec.label_names
    return [{"id": i, "label": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p)))}
            for i, p in zip(ids, probabilities)]


def render(records: list[dict[str, Any]], suffix: str) -> str:
    """The records as JSON lines, or as a TSV/CSV table with one `prob_<class>` column per class."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    flat = [{k: v for k, v in r.items() if k != "probabilities"}
            | {f"prob_{name}": f"{p:.6g}" for name, p in r.get("probabilities", {}).items()} for r in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]), delimiter="\t" if suffix == ".tsv" else ",",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def one_source(request: PredictRequest, spec: TaskSpec, cfg: RunConfig) -> Rows:
    choices = column_choices(spec, run_columns(cfg, spec), request.text_columns, None)
    no_header = reads_headerless(cfg, request.no_header, request.text_columns)
    parts = read_source(request.data, spec, choices, labeled=False, id_column=request.id_column, no_header=no_header)
    if len(parts) != 1:
        raise MatekdError(f"--data {request.data} holds {len(parts)} data sets ({', '.join(p.name for p in parts)}); "
                          "give one file")
    return parts[0]


def _checked_rows(request: PredictRequest, cfg: RunConfig, spec: TaskSpec) -> Rows:
    check_output_path(request.out)
    return one_source(request, spec, cfg)


def predict_file(request: PredictRequest) -> dict[str, Any] | None:
    """Load and check everything, score the rows over the ranks, write --out (rank 0)."""
    loaded = load_target(request.target, request.config, request.overrides, partial(_checked_rows, request))
    rows = loaded.data
    data = encode_rows(loaded, rows.examples)
    distributed.init()  # after every input check
    outputs = score(loaded.model, data, loaded.cfg.eval.batch_size, loaded.tokenizer.pad_token_id)
    if not distributed.is_main():
        return None
    write_atomic(request.out, render(prediction_records(loaded.spec, rows.ids, outputs), request.out.suffix.lower()))
    return {"model": loaded.target.model, "task": loaded.spec.name, "data": request.data, "examples": len(rows.ids),
            "out": str(request.out), "world_size": distributed.world_size()}


def score(model: torch.nn.Module, data: Encoded, batch_size: int, pad_id: int) -> np.ndarray:
    """Outputs for every row, in order, on every rank (each rank runs its shard)."""
    device = distributed.device()
    model.to(device)
    return model_outputs(model, data, batch_size, pad_id, device)


def summary_line(summary: dict[str, Any]) -> str:
    """What `matekd predict` (or `--glue-test`) wrote, in one line."""
    if "written" in summary:
        files = ", ".join(f"{name} ({_rows_written(w)})" for name, w in summary["written"].items())
        missing = summary["missing_for_a_full_submission"]
        rest = f"a full GLUE submission still needs {', '.join(missing)}" if missing else "all 11 GLUE files are there"
        if any(w["rows"] != w.get("glue_rows", w["rows"]) for w in summary["written"].values()):
            rest += "; --force: row counts not GLUE's, so not a complete leaderboard submission"
        return f"wrote {files} to {summary['out']}; {rest}"
    return (f"wrote {summary['examples']} predictions of {summary['model']} ({summary['task']}) to {summary['out']} "
            f"on {summary['world_size']} rank(s)")


def _rows_written(written: dict[str, Any]) -> str:
    glue = written.get("glue_rows", written["rows"])
    return f"{written['rows']} rows" if written["rows"] == glue else f"{written['rows']} of GLUE's {glue} rows"
