"""What `matekd eval --data` and `matekd predict --data` read: any file or folder, in the terms
of a run's task (its text columns, label column and label names).

A source is one of
- a table: CSV, TSV, JSON lines, a JSON array or Parquet (`.csv`, `.tsv`, `.jsonl`, `.json`,
  `.parquet`); `FILE.json:KEY` for the array under KEY of a JSON object keyed by set (AdvGLUE's
  dev.json); headerless CSV/TSV with `no_header` and columns by number (`--text-columns 0`);
- a folder saved with datasets' `save_to_disk` (`FOLDER:SPLIT` for a DatasetDict's split; a
  GLUE task's whole DatasetDict is read like a GLUE folder);
- a GLUE task in the GLUE download's format: a task folder (or GLUE root) with its dev split(s)
  only, or one of its TSV files (CoLA's headerless ones included);
- a hub dataset split: `hub:<dataset>[:<config>]:<split>`, e.g. `hub:nyu-mll/glue:sst2:validation`.

Columns are found by name: the run's own (`data.text_columns`/`data.label_column` of a custom
task), else a GLUE task's hub field names (`sentence`, `question1`, ..., `label`) or the names of
its TSV download (`#1 String`, `Quality`, ...), whichever the file has; `--text-columns` and
`--label-column` say otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matekd_ds.data.glue import TaskSpec
from matekd_ds.data.loaders import (
    _TSV_LAYOUTS,
    Example,
    _parse_glue_tsv,
    _read_lines,
    example_from_record,
    glue_split_names,
    is_saved_dataset,
    is_saved_dataset_dict,
    load_glue_dir,
    read_records,
    split_selector,
    table_format,
)
from matekd_ds.errors import MatekdError

HUB_PREFIX = "hub:"
ID_COLUMNS = ("id", "idx", "index", "guid")  # the first one a row has names it in predictions


@dataclass(frozen=True)
class Columns:
    text: tuple[str, ...]
    label: str | None  # None: unlabeled (predictions only)

    def present_in(self, record: dict[str, Any], labeled: bool) -> bool:
        needed = (*self.text, self.label) if labeled else self.text
        return all(column in record for column in needed)


@dataclass(frozen=True)
class Rows:
    """One source's examples and, for predictions, each row's id."""

    name: str
    examples: list[Example]
    ids: list[str]


def column_choices(spec: TaskSpec, run_columns: Columns | None, text_columns: Sequence[str] | None = None,
                   label_column: str | None = None) -> list[Columns]:
    """The column sets to look for, in order. Explicit `text_columns`/`label_column` win; then
    the run's columns (custom tasks); then a GLUE task's hub names and TSV download names."""
    if text_columns:
        default_label = run_columns.label if run_columns else "label"
        return [Columns(tuple(text_columns), label_column or default_label)]
    choices = [run_columns] if run_columns is not None else []
    if spec.name in _TSV_LAYOUTS:
        choices.append(Columns(spec.text_keys, "label"))
        layout = _TSV_LAYOUTS[spec.name]
        if layout.has_header:
            choices.append(Columns(tuple(map(str, layout.text_columns)), str(layout.label_column)))
    if label_column:
        choices = [Columns(c.text, label_column) for c in choices]
    return list(dict.fromkeys(choices))  # SST-2's download names are its hub names: once is enough


def read_source(source: str, spec: TaskSpec, choices: Sequence[Columns], labeled: bool,
                id_column: str | None = None, no_header: bool = False) -> list[Rows]:
    """The examples of `source` (one Rows per split: a GLUE folder of MNLI has two).
    `no_header`: a CSV/TSV file without a header line, its columns chosen by number."""
    if source.startswith(HUB_PREFIX):
        return [_rows_of_records(source, _hub_records(source), spec, choices, labeled, id_column)]
    path, key = split_selector(source)
    if no_header:
        choices = _numbered_choices(source, choices, labeled, id_column)
    if _is_glue_folder(path, key, spec):
        if no_header:
            raise MatekdError(f"{source} is a folder; --no-header reads one CSV or TSV file")
        return _glue_folder(path, source, spec)
    if not path.exists():
        raise MatekdError(f"data file not found: {source}")
    kind = table_format(path)
    if (kind == "tsv" and not no_header and spec.name in _TSV_LAYOUTS
            and _glue_layout_applies(path, spec, choices, labeled)):
        examples = _parse_glue_tsv(spec, _TSV_LAYOUTS[spec.name], path)
        return [Rows(source, examples, [str(i) for i in range(len(examples))])]
    return [_rows_of_records(source, read_records(source, no_header), spec, choices, labeled, id_column)]


def _is_glue_folder(path: Path, key: str | None, spec: TaskSpec) -> bool:
    """A GLUE download folder, or a GLUE task's whole saved DatasetDict (read by its dev
    splits); any other saved dataset is a table of rows."""
    if not path.is_dir() or key is not None:
        return False
    return not is_saved_dataset(path) or (is_saved_dataset_dict(path) and spec.name in _TSV_LAYOUTS)


def _numbered_choices(source: str, choices: Sequence[Columns], labeled: bool,
                      id_column: str | None) -> list[Columns]:
    """Without a header, columns are named by number ("0", "1", ...): keep the choices that are."""
    def numbered(c: Columns) -> bool:
        return all(str(name).isdigit() for name in (*c.text, *([c.label] if labeled else [])))

    kept = [c for c in choices if numbered(c)]
    if not kept or (id_column is not None and not id_column.isdigit()):
        label = " --label-column N" if labeled else ""
        raise MatekdError(f"{source}: --no-header: name the columns by number from 0 "
                          f"(--text-columns 0[,1]{label}{' --id-column N' if id_column else ''})")
    return kept


def _glue_folder(path: Path, source: str, spec: TaskSpec) -> list[Rows]:
    """A GLUE folder (task folder or root): its dev split(s); no training file is needed."""
    if spec.name not in _TSV_LAYOUTS:
        raise MatekdError(f"{source} is a folder: a GLUE task's folder needs a GLUE task (task={spec.name} "
                          "reads files: give a .csv, .tsv, .jsonl, .json or .parquet file, or a folder saved "
                          "with datasets' save_to_disk)")
    splits = [name for name in glue_split_names(spec) if name != "train"]
    out = []
    for split in splits:
        examples = load_glue_dir(spec, path, split)
        name = source if len(splits) == 1 else f"{source}:{split}"
        out.append(Rows(name, examples, [str(i) for i in range(len(examples))]))
    return out


def first_line_fields(path: Path) -> list[str]:
    """The tab-separated fields of a file's first line, stripped (a header, or a first row)."""
    first = next(_read_lines(path), None)  # one-line errors for unreadable or non-UTF-8 files
    if first is None:
        raise MatekdError(f"{path} is empty")
    return [field.strip() for field in first[1].split("\t")]


def _glue_layout_applies(path: Path, spec: TaskSpec, choices: Sequence[Columns], labeled: bool) -> bool:
    """A TSV file of the GLUE download itself is read with its layout (CoLA's have no header,
    QQP's training file has a few broken rows); a table with other named columns, by name."""
    layout = _TSV_LAYOUTS[spec.name]
    header = dict.fromkeys(first_line_fields(path), "")
    if not layout.has_header:
        return not any(choice.present_in(header, labeled) for choice in choices)
    own = Columns(tuple(map(str, layout.text_columns)), str(layout.label_column))
    others_match = any(c.present_in(header, labeled) for c in choices if c != own)
    return labeled and own.present_in(header, True) and not others_match


def _choose(record: dict[str, Any], choices: Sequence[Columns], labeled: bool, where: str) -> Columns:
    for choice in choices:
        if choice.present_in(record, labeled):
            return choice
    wanted = " or ".join("[" + ", ".join((*c.text, *([c.label] if labeled else []))) + "]" for c in choices)
    raise MatekdError(f"{where}: no columns {wanted}; columns: {', '.join(map(str, record)) or '(none)'} "
                      "(--text-columns/--label-column name them)")


def _rows_of_records(name: str, records: Iterable[tuple[str, dict[str, Any]]], spec: TaskSpec,
                     choices: Sequence[Columns], labeled: bool, id_column: str | None) -> Rows:
    examples: list[Example] = []
    ids: list[str] = []
    columns: Columns | None = None
    for where, record in records:
        if columns is None:
            columns = _choose(record, choices, labeled, where)
            if id_column is not None and id_column not in record:
                raise MatekdError(f"{where}: no id column {id_column!r}; columns: {', '.join(map(str, record))}")
            id_column = id_column or next((c for c in ID_COLUMNS if c in record), None)
        label = columns.label if labeled else None
        examples.append(example_from_record(record, where, columns.text, label, spec.label_names,
                                            spec.is_regression, len(examples)))
        ids.append(str(record[id_column]) if id_column is not None else str(len(ids)))
    if not examples:
        raise MatekdError(f"{name} has no data rows")
    return Rows(name, examples, ids)


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """`hub:<dataset>[:<config>]:<split>` -> (dataset, config, split)."""
    parts = source[len(HUB_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise MatekdError(f"hub data source {source!r}: write hub:<dataset>[:<config>]:<split>, "
                          "e.g. hub:nyu-mll/glue:sst2:validation")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def _hub_records(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    dataset, config, split = parse_hub_source(source)
    try:
        import datasets  # imported lazily: only hub sources need it

        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as error:  # network, auth, unknown split: many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MatekdError(f"could not load {source} from the hub: {reason}") from None
    return ((f"{source} row {i}", dict(row)) for i, row in enumerate(rows))
