"""Turn GLUE data (hub, TSV download, or a DatasetDict saved with ``save_to_disk``) and user
tables (CSV/TSV/JSONL/JSON, Parquet, saved datasets) into ``Example`` lists.

Every user-facing problem (missing file, column, bad label, ...) raises ``MatekdError`` with
a one-line message that names the file, line and the valid choices.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matekd_ds.data.glue import GLUE_HUB_PATH, TaskSpec
from matekd_ds.errors import MatekdError

logger = logging.getLogger(__name__)

Label = int | float


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one or two text segments
    label: Label  # class id, or float for regression
    index: int | None = None  # 0-based position of the row within its split


# --------------------------------------------------------------------------- split names


def glue_split_names(task: TaskSpec) -> dict[str, str]:
    """Our split names -> hub split names, e.g. {"train": "train", "dev": "validation"}.

    The same names are the TSV file stems of the GLUE download (``dev.tsv``, ``dev_matched.tsv``).
    """
    names = {"train": "train"}
    for hub_split in task.dev_splits:
        names["dev" + hub_split.removeprefix("validation")] = hub_split
    return names


def _check_split(task: TaskSpec, split: str) -> str:
    """Return the hub split name for ``split`` or raise naming the valid splits."""
    names = glue_split_names(task)
    if split not in names:
        raise MatekdError(
            f"unknown split {split!r} for GLUE task {task.name}; valid splits: {', '.join(names)}"
        )
    return names[split]


# --------------------------------------------------------------------------- labels


def _parse_label(
    raw: Any, label_names: Sequence[str] | None, regression: bool, where: str
) -> Label:
    """Convert one raw label cell to a class id (or float for regression).

    With ``label_names``, a label may be a class name or an integer index into the names.
    Without them, labels must be non-negative integers. ``where`` names the file and line.
    """
    if isinstance(raw, bool) or raw is None:
        raise MatekdError(f"{where}: invalid label {raw!r}")
    if regression:
        return _parse_float_label(raw, where)
    text = raw.strip() if isinstance(raw, str) else raw
    if label_names is not None and isinstance(text, str) and text in label_names:
        return list(label_names).index(text)
    class_id = _as_int(text)
    num_classes = None if label_names is None else len(label_names)
    if class_id is None or class_id < 0 or (num_classes is not None and class_id >= num_classes):
        choices = ""
        if label_names is not None:
            choices = f"; valid labels: {', '.join(label_names)} (or 0..{len(label_names) - 1})"
        raise MatekdError(f"{where}: unknown label {raw!r}{choices}")
    return class_id


def _parse_float_label(raw: Any, where: str) -> float:
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise MatekdError(f"{where}: regression label {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise MatekdError(f"{where}: regression label {raw!r} is not a finite number")
    return value


def _as_int(value: Any) -> int | None:
    """Integer value of ``value`` ("3", 3, 3.0), or None when it is not a whole number."""
    if isinstance(value, numbers.Integral):  # also numpy integers from datasets/pandas
        return int(value)
    if isinstance(value, numbers.Real):
        return int(value) if float(value).is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _parse_text(raw: Any, column: str, where: str) -> str:
    if not isinstance(raw, str):
        raise MatekdError(
            f"{where}: text column {column!r} holds {raw!r}, expected a string"
        )
    return raw.strip()


# --------------------------------------------------------------------------- plain line reading


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline), skipping blank lines.

    newline="\\n" keeps a stray "\\r" inside a text field from splitting the line;
    "utf-8-sig" drops a byte-order mark some TSV exports start with.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="\n") as handle:
            for line_no, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line_no, line
    except UnicodeDecodeError as error:
        raise MatekdError(
            f"{path} is not valid UTF-8 text: {error.reason} at byte {error.start}"
        ) from None
    except OSError as error:
        raise MatekdError(f"could not read {path}: {error.strerror or error}") from None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise MatekdError(f"data file not found: {path}")


# --------------------------------------------------------------------------- GLUE TSV download


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's texts and label sit in the GLUE download's TSV files."""

    text_columns: tuple[str | int, ...]  # header names, or 0-based positions without a header
    label_column: str | int
    has_header: bool = True
    num_fields: int | None = None  # expected fields per row when there is no header
    tolerate_malformed: bool = False  # QQP's train file has a few broken rows


_MAX_MALFORMED_FRACTION = 0.01

_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    # CoLA: source, label, original_label_mark, sentence -- no header line.
    "cola": _TsvLayout((3,), 1, has_header=False, num_fields=4),
    "sst2": _TsvLayout(("sentence",), "label"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", tolerate_malformed=True),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "wnli": _TsvLayout(("sentence1", "sentence2"), "label"),
}


def find_glue_tsv(task: TaskSpec, directory: str | Path, split: str) -> Path:
    """Path of ``<split>.tsv`` in ``directory`` itself or in its task subfolder (GLUE root)."""
    _check_split(task, split)
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise MatekdError(f"GLUE data directory not found: {directory}")
    file_name = f"{split}.tsv"
    candidates = [directory / file_name]
    candidates += [directory / sub / file_name for sub in (*task.tsv_dir_names, task.hub_config)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise MatekdError(f"GLUE {task.name} {split} file not found; looked for: {tried}")


def load_glue_dir(task: TaskSpec, directory: str | Path, split: str) -> list[Example]:
    """Read one split of ``task`` from ``directory``: the GLUE TSV download, or the task's
    DatasetDict saved with ``save_to_disk`` (``load_dataset("nyu-mll/glue", "sst2").save_to_disk(D)``)."""
    saved = find_saved_glue_dataset(task, directory)
    if saved is not None:
        hub_split = _check_split(task, split)
        return _examples_from_hub_rows(task, load_saved_dataset(saved, hub_split), hub_split, str(saved))
    path = find_glue_tsv(task, directory, split)
    return _parse_glue_tsv(task, _TSV_LAYOUTS[task.name], path)


def find_saved_glue_dataset(task: TaskSpec, directory: str | Path) -> Path | None:
    """``directory`` (or its task subfolder) when it is a DatasetDict saved with save_to_disk."""
    directory = Path(directory).expanduser()
    candidates = [directory, *(directory / sub for sub in (*task.tsv_dir_names, task.hub_config))]
    return next((c for c in candidates if is_saved_dataset_dict(c)), None)


def _parse_glue_tsv(task: TaskSpec, layout: _TsvLayout, path: Path) -> list[Example]:
    # Plain tab splitting on purpose: GLUE text contains unbalanced quote characters,
    # which csv quoting rules would merge across rows.
    lines = _read_lines(path)
    text_positions, label_position, num_fields = _resolve_columns(layout, lines, path)
    examples: list[Example] = []
    malformed_line_nos: list[int] = []
    for line_no, line in lines:
        fields = line.split("\t")
        if len(fields) != num_fields:
            if layout.tolerate_malformed:
                malformed_line_nos.append(line_no)
                continue
            raise MatekdError(
                f"{path}, line {line_no}: expected {num_fields} tab-separated fields, "
                f"found {len(fields)}"
            )
        where = f"{path}, line {line_no}"
        texts = tuple(fields[position].strip() for position in text_positions)
        label = _parse_label(fields[label_position], task.label_names, task.is_regression, where)
        examples.append(Example(texts, label, len(examples)))
    _check_malformed(path, malformed_line_nos, len(examples))
    if not examples:
        raise MatekdError(f"{path} has no data rows")
    return examples


def _resolve_columns(
    layout: _TsvLayout, lines: Iterator[tuple[int, str]], path: Path
) -> tuple[tuple[int, ...], int, int]:
    """Positions of the text and label columns and the expected field count; consumes the header."""
    if not layout.has_header:
        positions = tuple(int(column) for column in layout.text_columns)
        return positions, int(layout.label_column), int(layout.num_fields or 0)
    first = next(lines, None)
    if first is None:
        raise MatekdError(f"{path} is empty; expected a header line")
    header = [name.strip() for name in first[1].split("\t")]

    def position(column: str | int) -> int:
        if column not in header:
            raise MatekdError(f"{path} has no column {column!r}; columns: {', '.join(header)}")
        return header.index(str(column))

    text_positions = tuple(position(column) for column in layout.text_columns)
    return text_positions, position(layout.label_column), len(header)


def _check_malformed(path: Path, malformed_line_nos: list[int], num_good: int) -> None:
    if not malformed_line_nos:
        return
    total = num_good + len(malformed_line_nos)
    shown = ", ".join(str(n) for n in malformed_line_nos[:5])
    if len(malformed_line_nos) > _MAX_MALFORMED_FRACTION * total:
        raise MatekdError(
            f"{path}: {len(malformed_line_nos)} of {total} rows have the wrong number of fields "
            f"(more than {_MAX_MALFORMED_FRACTION:.0%}; first at lines {shown})"
        )
    logger.warning(
        "%s: skipped %d malformed rows (lines %s ...)", path, len(malformed_line_nos), shown
    )


# --------------------------------------------------------------------------- Hugging Face hub


def load_glue_hub(task: TaskSpec, split: str, cache_dir: str | Path | None = None) -> list[Example]:
    """Load one split of ``nyu-mll/glue`` with the ``datasets`` library."""
    hub_split = _check_split(task, split)
    try:
        import datasets  # imported lazily: only hub loading needs it

        rows = datasets.load_dataset(
            GLUE_HUB_PATH, task.hub_config, split=hub_split,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as error:  # network, auth and cache errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MatekdError(
            f"could not load GLUE task {task.name} from the hub: {reason}; "
            "pass data.path=<dir with GLUE TSVs> to load local files"
        ) from error
    return _examples_from_hub_rows(task, rows, hub_split)


def _examples_from_hub_rows(task: TaskSpec, rows: Any, hub_split: str, source: str | None = None) -> list[Example]:
    source = source or f"{GLUE_HUB_PATH}/{task.hub_config}"
    examples: list[Example] = []
    for row_index, row in enumerate(rows):
        where = f"{source} {hub_split} row {row_index}"
        missing = [key for key in (*task.text_keys, "label") if key not in row]
        if missing:
            raise MatekdError(
                f"{where}: missing fields {', '.join(missing)}; fields: {', '.join(row)}"
            )
        texts = tuple(_parse_text(row[key], key, where) for key in task.text_keys)
        label = _parse_label(row["label"], task.label_names, task.is_regression, where)
        examples.append(Example(texts, label, row_index))
    return examples


def load_glue(
    task: TaskSpec,
    split: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> list[Example]:
    """Local GLUE TSVs when ``data_dir`` is given, otherwise the hub."""
    if data_dir is not None:
        return load_glue_dir(task, data_dir, split)
    return load_glue_hub(task, split, cache_dir=cache_dir)


# --------------------------------------------------------------------------- user tables


_TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
SAVED = "saved dataset"  # a folder written by datasets' save_to_disk
# What save_to_disk writes: a Dataset's folder holds the first two, a DatasetDict's the last.
_SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")
HEADERLESS_FORMATS = ("csv", "tsv")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES)


def is_saved_dataset_dict(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def split_selector(source: str | Path) -> tuple[Path, str | None]:
    """`FILE.json:KEY` (one set of a JSON object keyed by name, as AdvGLUE's dev.json) or
    `FOLDER:SPLIT` (one split of a DatasetDict saved with save_to_disk) -> (path, KEY); anything
    else -> (path, None). A path that exists as written is never split."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or ":" not in text:
        return path, None
    base, key = text.rsplit(":", 1)
    base_path = Path(base).expanduser()
    return (base_path, key) if key and base_path.exists() else (path, None)


def table_format(path: str | Path) -> str:
    """"csv", "tsv", "jsonl", "json" (a JSON array, an object of named arrays, or JSON lines) or
    "parquet" from the file's suffix; SAVED for a folder written by save_to_disk."""
    path = Path(path)
    if is_saved_dataset(path):
        return SAVED
    found = _TABLE_FORMATS.get(path.suffix.lower())
    if found is None:
        raise MatekdError(
            f"unsupported table format {path.suffix!r} for {path}; "
            f"use one of: {', '.join(_TABLE_FORMATS)}, or a folder saved with datasets' save_to_disk"
        )
    return found


def read_records(source: str | Path, no_header: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each row of a CSV, TSV, JSON-lines, JSON or Parquet file, or of a saved dataset, as
    (where, {column: value}); ``where`` names the file and line (or item, or row) for error
    messages. ``source`` may pick one set: `FILE.json:KEY`, `FOLDER:SPLIT`. ``no_header``: a
    CSV/TSV file whose first line is data; its columns are named "0", "1", ..."""
    path, key = split_selector(source)
    kind = table_format(path)
    if kind != SAVED:
        _require_file(path)
    _check_reading_options(path, kind, key, no_header)
    if kind == SAVED:
        records = _saved_dataset_records(path, key)
    elif kind == "json":
        records = _json_records(path, key)
    elif kind in HEADERLESS_FORMATS:
        records = (_csv_records if kind == "csv" else _tsv_records)(path, header=not no_header)
    else:
        records = {"jsonl": _jsonl_records, "parquet": _parquet_records}[kind](path)
    name = str(path) if key is None else f"{path}:{key}"
    return ((f"{name}, {place}", record) for place, record in records)


def _check_reading_options(path: Path, kind: str, key: str | None, no_header: bool) -> None:
    if key is not None and kind not in ("json", SAVED):
        raise MatekdError(f"{path}:{key}: ':{key}' picks one set of a .json object or one split of a saved "
                          f"dataset; {path} is a {kind} file")
    if no_header and kind not in HEADERLESS_FORMATS:
        raise MatekdError(f"{path}: headerless reading (--no-header, data.no_header) is for CSV and TSV files; "
                          f"this is a {kind} {'folder' if kind == SAVED else 'file'} with named columns")


def load_table(
    path: str | Path,
    text_columns: Sequence[str],
    label_column: str,
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    no_header: bool = False,
) -> list[Example]:
    """Read a CSV, TSV, JSON-lines, JSON, Parquet file (chosen by extension) or a saved dataset
    (see read_records) into examples.

    Labels: with ``label_names`` each label is a class name or an index into them; without,
    a non-negative integer; with ``regression`` a float. ``no_header``: columns by number.
    """
    if not text_columns:
        raise MatekdError(f"no text columns given for {path}")
    examples: list[Example] = []
    for where, record in read_records(path, no_header):
        examples.append(example_from_record(record, where, text_columns, label_column, label_names,
                                            regression, len(examples)))
    if not examples:
        raise MatekdError(f"{path} has no data rows")
    return examples


def example_from_record(
    record: Mapping[str, Any],
    where: str,
    text_columns: Sequence[str],
    label_column: str | None,
    label_names: Sequence[str] | None,
    regression: bool,
    index: int,
) -> Example:
    """One record as an Example; ``label_column`` None: unlabeled (label 0, never scored)."""
    needed = (*text_columns, label_column) if label_column is not None else tuple(text_columns)
    _check_columns(record, needed, where)
    texts = tuple(_parse_text(record[column], column, where) for column in text_columns)
    label = 0 if label_column is None else _parse_label(record[label_column], label_names, regression, where)
    return Example(texts, label, index)


def _check_columns(record: Mapping[str, Any], needed: Sequence[str], where: str) -> None:
    missing = [column for column in needed if column not in record]
    if missing:
        available = ", ".join(record) or "(none)"
        names = ", ".join(map(repr, missing))
        raise MatekdError(f"{where}: no column {names}; columns: {available}")


def _numbered(fields: list[str]) -> list[str]:
    """A headerless file's column names: "0", "1", ... (what --text-columns 0 names)."""
    return [str(i) for i in range(len(fields))]


def _csv_records(path: Path, header: bool = True) -> Iterator[tuple[str, dict[str, str]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            names = None
            if header:
                first = next(reader, None)
                if first is None:
                    raise MatekdError(f"{path} is empty; expected a header line")
                names = [name.strip() for name in first]
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue  # blank line
                names = _numbered(fields) if names is None else names
                yield f"line {reader.line_num}", _record(names, fields, path, reader.line_num)
    except UnicodeDecodeError as error:
        raise MatekdError(
            f"{path} is not valid UTF-8 text: {error.reason} at byte {error.start}"
        ) from None
    except csv.Error as error:
        raise MatekdError(f"{path}: malformed CSV: {error}") from None


def _tsv_records(path: Path, header: bool = True) -> Iterator[tuple[str, dict[str, str]]]:
    lines = _read_lines(path)
    names = None
    if header:
        first = next(lines, None)
        if first is None:
            raise MatekdError(f"{path} is empty; expected a header line")
        names = [name.strip() for name in first[1].split("\t")]
    for line_no, line in lines:
        fields = line.split("\t")
        names = _numbered(fields) if names is None else names
        yield f"line {line_no}", _record(names, fields, path, line_no)


def _record(header: list[str], fields: list[str], path: Path, line_no: int) -> dict[str, str]:
    if len(fields) != len(header):
        raise MatekdError(
            f"{path}, line {line_no}: expected {len(header)} fields, found {len(fields)}"
        )
    return dict(zip(header, fields))


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    saw_line = False
    for line_no, line in _read_lines(path):
        saw_line = True
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MatekdError(f"{path}, line {line_no}: invalid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise MatekdError(
                f"{path}, line {line_no}: expected a JSON object per line, "
                f"got {type(record).__name__}"
            )
        yield f"line {line_no}", record
    if not saw_line:
        raise MatekdError(f"{path} is empty")


def _json_records(path: Path, key: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """A ``.json`` file: one JSON array of objects (as many public sets ship), JSON lines, or
    (with ``key``) the array under ``key`` of one object keyed by set, as AdvGLUE's dev.json
    (``{"sst2": [...], "qnli": [...]}``)."""
    text = "".join(line + "\n" for _, line in _read_lines(path))
    if key is None and not text.lstrip().startswith("["):
        _refuse_one_object(path, text)
        yield from _jsonl_records(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise MatekdError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if key is not None:
        rows = _keyed_set(path, rows, key)
    for number, record in enumerate(rows, start=1):
        if not isinstance(record, dict):
            raise MatekdError(f"{path}, item {number}: expected a JSON object, got {type(record).__name__}")
        yield f"item {number}", record


def _object_keys(value: dict[str, Any]) -> str:
    keys = [str(k) for k in value]
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")


def _refuse_one_object(path: Path, text: str) -> None:
    """A .json file that is one object of sets (or one pretty-printed object) is not JSON
    lines: say which keys it has and how to pick one, instead of "invalid JSON" at line 2."""
    if not text.lstrip().startswith("{"):
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON lines (or broken JSON): the line-by-line reader says which
    if not isinstance(value, dict):
        return
    holds_sets = any(isinstance(v, list) for v in value.values())
    if holds_sets or text.strip().count("\n") > 0:  # one line of scalars is one JSON-lines record
        raise MatekdError(f"{path} is one JSON object with keys {_object_keys(value)}; pick its rows with "
                          f"{path}:KEY")


def _keyed_set(path: Path, value: Any, key: str) -> list[Any]:
    if not isinstance(value, dict):
        raise MatekdError(f"{path}:{key}: {path} is a JSON {type(value).__name__}, not an object keyed by set")
    if key not in value:
        raise MatekdError(f"{path} has no key {key!r}; keys: {_object_keys(value)}")
    rows = value[key]
    if not isinstance(rows, list):
        raise MatekdError(f"{path}:{key} is a JSON {type(rows).__name__}, not an array of rows")
    return rows


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as parquet  # comes with datasets; only Parquet files need it

        table = parquet.read_table(path)
    except Exception as error:  # ArrowInvalid, OSError, ...: many types
        raise MatekdError(f"{path} is not a readable Parquet file: {_first_line(error)}") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", record


def load_saved_dataset(path: Path, split: str | None) -> Any:
    """The Dataset saved in ``path`` (save_to_disk), or ``split`` of a saved DatasetDict."""
    try:
        import datasets  # imported lazily: only saved datasets need it

        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged or foreign folder: many types
        raise MatekdError(f"{path}: could not read the saved dataset: {_first_line(error)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise MatekdError(f"{path} is a saved DatasetDict with splits {', '.join(loaded)}; "
                              f"pick one with {path}:SPLIT")
        if split not in loaded:
            raise MatekdError(f"{path} has no split {split!r}; splits: {', '.join(loaded)}")
        return loaded[split]
    if split is not None:
        raise MatekdError(f"{path} is one saved Dataset without splits; drop ':{split}'")
    return loaded


def _saved_dataset_records(path: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, record in enumerate(load_saved_dataset(path, split), start=1):
        yield f"row {number}", dict(record)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
