"""GLUE task registry, GLUE TSV parsing (real and synthetic files), hub wrapper and load_table."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from matekd_ds.data.glue import GLUE_TASKS, get_task
from matekd_ds.data.loaders import (
    Example,
    glue_split_names,
    load_glue,
    load_glue_dir,
    load_glue_hub,
    load_table,
)
from matekd_ds.errors import MatekdError

GLUE_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/glue"


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- task registry


@pytest.mark.parametrize(
    ("alias", "name"),
    [("SST-2", "sst2"), ("sst2", "sst2"), ("Sst_2", "sst2"), ("STS-B", "stsb"),
     ("mnli", "mnli"), (" QQP ", "qqp"), ("CoLA", "cola")],
)
def test_get_task_accepts_aliases(alias: str, name: str) -> None:
    assert get_task(alias).name == name


def test_get_task_unknown_name_lists_valid_tasks() -> None:
    with pytest.raises(MatekdError, match="unknown GLUE task 'sst3'; valid tasks: cola, sst2"):
        get_task("sst3")


def test_registry_has_all_nine_tasks_with_hub_label_order() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1
    assert get_task("mnli").num_labels == 3 and not get_task("mnli").is_regression


def test_split_names() -> None:
    assert glue_split_names(get_task("rte")) == {"train": "train", "dev": "validation"}
    assert glue_split_names(get_task("mnli")) == {
        "train": "train",
        "dev_matched": "validation_matched",
        "dev_mismatched": "validation_mismatched",
    }


# --------------------------------------------------------------------------- real GLUE files


def real_glue_root() -> Path:
    if not GLUE_ROOT.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_ROOT}")
    return GLUE_ROOT


def data_lines(path: Path) -> list[str]:
    """Non-blank lines after the header."""
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return lines[1:]


@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("task_dir", ["SST-2", "RTE", "MRPC", "STS-B", "WNLI"])
def test_real_glue_files_parse_completely(task_dir: str, split: str) -> None:
    task = get_task(task_dir)
    path = real_glue_root() / task_dir / f"{split}.tsv"
    examples = load_glue_dir(task, path.parent, split)
    lines = data_lines(path)
    assert len(examples) == len(lines)
    assert [example.index for example in examples[:3]] == [0, 1, 2]
    for example in examples:
        assert len(example.texts) == len(task.text_keys)
        assert all(text == text.strip() for text in example.texts)
    if task.is_regression:
        assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in examples)
    else:
        labels = {example.label for example in examples}
        assert all(isinstance(label, int) for label in labels)
        assert labels == set(range(task.num_labels))
    # Quotes only ever occur inside text, so plain tab splitting must keep every one of them.
    quoted_examples = sum(any('"' in text for text in e.texts) for e in examples)
    assert quoted_examples == sum('"' in line for line in lines)


def test_real_glue_root_directory_and_known_rows() -> None:
    root = real_glue_root()
    mrpc = load_glue_dir(get_task("MRPC"), root, "train")  # GLUE root, not the task dir
    assert mrpc[0].texts[0].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert mrpc[0].label == 1
    rte = load_glue_dir(get_task("rte"), root, "dev")
    assert rte[0].label == get_task("rte").label_names.index("not_entailment") == 1
    assert load_glue(get_task("sst2"), "dev", data_dir=root)[0].texts == (
        "it 's a charming and often affecting journey .",
    )


# --------------------------------------------------------------------------- synthetic GLUE files


def test_cola_has_no_header(tmp_path: Path) -> None:
    write(tmp_path / "CoLA" / "train.tsv", [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub \"dry\".",
        "",
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
    ])
    examples = load_glue_dir(get_task("cola"), tmp_path, "train")
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[1] == Example(('They drank the pub "dry".',), 0, 1)


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", ["gj04\t1\t\tfine", "gj04\t1\tbroken row"])
    message = r"dev.tsv, line 2: expected 4 tab-separated fields, found 3"
    with pytest.raises(MatekdError, match=message):
        load_glue_dir(get_task("cola"), path.parent, "dev")


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"


def test_qqp_skips_a_few_malformed_rows(tmp_path: Path) -> None:
    rows = [f"{i}\t{2 * i}\t{2 * i + 1}\tHow do I {i}?\tWhat is {i}?\t{i % 2}" for i in range(120)]
    write(tmp_path / "QQP" / "train.tsv", [QQP_HEADER, *rows[:50], "50\t100\tbroken", *rows[50:]])
    examples = load_glue_dir(get_task("qqp"), tmp_path, "train")
    assert len(examples) == 120
    assert examples[50] == Example(("How do I 50?", "What is 50?"), 0, 50)


def test_qqp_too_many_malformed_rows_is_an_error(tmp_path: Path) -> None:
    rows = ["0\t0\t1\tq one\tq two\t1", "1\t2\tbroken", "2\t4\t5\tq three\tq four\t0"]
    write(tmp_path / "dev.tsv", [QQP_HEADER, *rows])
    with pytest.raises(MatekdError, match=r"1 of 3 rows have the wrong number of fields"):
        load_glue_dir(get_task("qqp"), tmp_path, "dev")


MNLI_HEADER = "\t".join([
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2",
    "label1", "label2", "label3", "label4", "label5", "gold_label",
])


def mnli_row(index: int, premise: str, hypothesis: str, gold: str) -> str:
    parses = ["( x )"] * 4
    return "\t".join([str(index), "1", f"{index}n", "fiction", *parses, premise, hypothesis,
                      gold, gold, gold, gold, gold, gold])


def test_mnli_matched_and_mismatched(tmp_path: Path) -> None:
    mnli_dir = tmp_path / "MNLI"
    write(mnli_dir / "dev_matched.tsv", [
        MNLI_HEADER,
        mnli_row(0, "The cat sat.", "A cat sat.", "entailment"),
        mnli_row(1, 'He said "no".', "He agreed.", "contradiction"),
    ])
    write(mnli_dir / "dev_mismatched.tsv", [
        MNLI_HEADER,
        mnli_row(0, "It rained.", "It was wet.", "neutral"),
    ])
    task = get_task("MNLI")
    matched = load_glue_dir(task, tmp_path, "dev_matched")
    assert [e.label for e in matched] == [0, 2]
    assert matched[1].texts == ('He said "no".', "He agreed.")
    assert load_glue_dir(task, mnli_dir, "dev_mismatched") == [
        Example(("It rained.", "It was wet."), 1, 0)
    ]
    with pytest.raises(MatekdError, match="unknown split 'dev'.*dev_matched, dev_mismatched"):
        load_glue_dir(task, tmp_path, "dev")


def test_qnli_string_labels(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", [
        "index\tquestion\tsentence\tlabel",
        "0\tWhat is it?\tIt is a cat.\tentailment",
        "1\tWhere?\tNowhere in particular.\tnot_entailment",
    ])
    assert [e.label for e in load_glue_dir(get_task("qnli"), tmp_path, "train")] == [0, 1]


def test_unknown_label_names_value_and_line(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    message = r"line 2: unknown label 'maybe'; valid labels: entailment"
    with pytest.raises(MatekdError, match=message):
        load_glue_dir(get_task("rte"), tmp_path, "dev")


def test_out_of_range_int_label(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t2"])
    with pytest.raises(MatekdError, match=r"unknown label '2'"):
        load_glue_dir(get_task("wnli"), tmp_path, "dev")


def test_missing_header_column_is_named(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["sentence1\tsentence2\tlabel", "a\tb\t1"])
    message = r"no column 'score'; columns: sentence1, sentence2, label"
    with pytest.raises(MatekdError, match=message):
        load_glue_dir(get_task("stsb"), tmp_path, "train")


def test_missing_glue_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MatekdError, match=r"GLUE rte dev file not found; looked for: .*dev.tsv"):
        load_glue_dir(get_task("rte"), tmp_path, "dev")
    with pytest.raises(MatekdError, match="GLUE data directory not found"):
        load_glue_dir(get_task("rte"), tmp_path / "nope", "dev")


# --------------------------------------------------------------------------- hub loader (offline)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_loader_maps_split_names_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path, config, split, cache_dir=None):
        calls.append((path, config, split, cache_dir))
        return [{"premise": " P ", "hypothesis": "H", "label": 2, "idx": 0}]

    fake_datasets(monkeypatch, load_dataset)
    examples = load_glue_hub(get_task("mnli"), "dev_mismatched", cache_dir="/tmp/cache")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched", "/tmp/cache")]
    assert examples == [Example(("P", "H"), 2, 0)]


def test_hub_regression_labels_are_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {"sentence1": "a", "sentence2": "b", "label": 3.2}
    fake_datasets(monkeypatch, lambda *args, **kwargs: [row])
    assert load_glue(get_task("stsb"), "dev")[0].label == pytest.approx(3.2)


def test_hub_failure_suggests_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\nmore detail")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(MatekdError) as caught:
        load_glue_hub(get_task("rte"), "train")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("could not load GLUE task rte from the hub: Couldn't reach")
    assert "data.path=" in message


# --------------------------------------------------------------------------- load_table


def test_load_table_csv_with_label_names(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", [
        "text,extra,label",
        '"Hello, world",x,pos',
        "",
        '"She said ""hi""",y,neg',
        "plain,z,1",  # an index into label_names is accepted too
    ])
    examples = load_table(path, ["text"], "label", label_names=["neg", "pos"])
    assert examples == [
        Example(("Hello, world",), 1, 0),
        Example(('She said "hi"',), 0, 1),
        Example(("plain",), 1, 2),
    ]


def test_load_table_jsonl_pairs_and_regression(tmp_path: Path) -> None:
    rows = [{"a": "one", "b": "two", "y": 0.5}, {"a": "three", "b": "four", "y": 4}]
    path = write(tmp_path / "data.jsonl", [json.dumps(row) for row in rows])
    examples = load_table(path, ["a", "b"], "y", regression=True)
    assert examples == [Example(("one", "two"), 0.5, 0), Example(("three", "four"), 4.0, 1)]
    assert isinstance(examples[1].label, float)


def test_load_table_tsv_int_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "data.tsv", ["sentence\tlabel", 'a "quoted\t3', "b\t0"])
    assert load_table(path, ["sentence"], "label") == [
        Example(('a "quoted',), 3, 0), Example(("b",), 0, 1)
    ]


def test_load_table_missing_column_names_available_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", ["text,target", "hi,1"])
    with pytest.raises(MatekdError, match=r"no column 'label'; columns: text, target"):
        load_table(path, ["text"], "label")


def test_load_table_unknown_label_names_value_and_line(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "neg"}, {"text": "b", "label": "meh"}]
    path = write(tmp_path / "data.jsonl", [json.dumps(row) for row in rows])
    message = r"data.jsonl, line 2: unknown label 'meh'; valid labels: neg, pos"
    with pytest.raises(MatekdError, match=message):
        load_table(path, ["text"], "label", label_names=["neg", "pos"])


def test_load_table_rejects_bad_labels_without_names(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", ["text,label", "a,1", "b,-1"])
    with pytest.raises(MatekdError, match=r"line 3: unknown label '-1'"):
        load_table(path, ["text"], "label")
    path = write(tmp_path / "reg.csv", ["text,label", "a,high"])
    with pytest.raises(MatekdError, match=r"line 2: regression label 'high' is not a number"):
        load_table(path, ["text"], "label", regression=True)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "is empty"),
        ("empty.jsonl", "\n\n", "is empty"),
        ("header_only.tsv", "text\tlabel\n", "has no data rows"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{oops\n', "line 2: invalid JSON"),
        ("data.xlsx", "x", "unsupported table format '.xlsx'"),
        ("data.parquet", "x", "is not a readable Parquet file"),
    ],
)
def test_load_table_file_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MatekdError, match=message):
        load_table(path, ["text"], "label")


def test_load_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MatekdError, match=r"data file not found: .*missing.csv"):
        load_table(tmp_path / "missing.csv", ["text"], "label")


# --------------------------------------------------------------------------- JSON arrays, the same rows in all formats


TREC_ROWS = [{"id": "q1", "question": 'What is "GLUE", really?', "label": "DESC"},
             {"id": "q2", "question": "Who wrote Hamlet, and when?", "label": "HUM"},
             {"id": "q3", "question": "How far is it from Denver to Aspen ?", "label": "NUM"}]
TREC_NAMES = ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"]


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    """The same three rows as quoted CSV, TSV, JSON lines and a JSON array."""
    import csv

    with open(tmp_path / "trec.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "question", "label"], quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(TREC_ROWS)
    write(tmp_path / "trec.tsv",
          ["id\tquestion\tlabel"] + [f"{r['id']}\t{r['question']}\t{r['label']}" for r in TREC_ROWS])
    write(tmp_path / "trec.jsonl", [json.dumps(r) for r in TREC_ROWS])
    (tmp_path / "trec.json").write_text(json.dumps(TREC_ROWS, indent=2), encoding="utf-8")
    return {suffix: tmp_path / f"trec.{suffix}" for suffix in ("csv", "tsv", "jsonl", "json")}


def test_every_table_format_gives_identical_examples(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path)
    loaded = {kind: load_table(path, ["question"], "label", label_names=TREC_NAMES) for kind, path in files.items()}
    expected = [Example(('What is "GLUE", really?',), 0, 0), Example(("Who wrote Hamlet, and when?",), 3, 1),
                Example(("How far is it from Denver to Aspen ?",), 4, 2)]
    for kind, examples in loaded.items():
        assert examples == expected, kind


def test_json_file_may_hold_json_lines_too(tmp_path: Path) -> None:
    path = write(tmp_path / "lines.json", [json.dumps(r) for r in TREC_ROWS])
    assert len(load_table(path, ["question"], "label", label_names=TREC_NAMES)) == 3


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", r"trec.json, item 1: expected a JSON object, got int"),
    ('[{"question": "a", "label": "DESC"}, {"label": "HUM"}]', r"trec.json, item 2: no column 'question'"),
    ("[{oops", r"trec.json: invalid JSON at line 1"),
])
def test_json_array_errors_name_the_item(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "trec.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MatekdError, match=message):
        load_table(path, ["question"], "label", label_names=TREC_NAMES)


# --------------------------------------------------------------------------- sources of `matekd eval/predict --data`


def _choices(task: str, **kwargs):
    from matekd_ds.data.sources import column_choices

    return column_choices(get_task(task), None, **kwargs)


def test_source_reads_a_headerless_cola_file_and_a_cola_table_with_hub_names(tmp_path: Path) -> None:
    from matekd_ds.data.sources import read_source

    cola = get_task("cola")
    write(tmp_path / "in_domain_dev.tsv",
          ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe more they get get."])
    write(tmp_path / "mine.tsv", ["sentence\tlabel", "Fine words.\tacceptable", "Words fine the.\t0"])
    (rows,) = read_source(str(tmp_path / "in_domain_dev.tsv"), cola, _choices("cola"), labeled=True)
    assert rows.examples == [Example(("The sailors rode the breeze.",), 1, 0),
                             Example(("The more they get get.",), 0, 1)]
    (rows,) = read_source(str(tmp_path / "mine.tsv"), cola, _choices("cola"), labeled=True)
    assert [e.label for e in rows.examples] == [1, 0]


def test_source_glue_folder_with_only_dev_files(tmp_path: Path) -> None:
    from matekd_ds.data.sources import read_source

    header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
    for split, label in (("dev_matched", "neutral"), ("dev_mismatched", "contradiction")):
        write(tmp_path / "MNLI" / f"{split}.tsv", [header, f"0\t1\t1\tg\t-\t-\t-\t-\tA.\tB.\t{label}\t{label}"])
    parts = read_source(str(tmp_path), get_task("mnli"), _choices("mnli"), labeled=True)  # a GLUE root, no train.tsv
    assert [p.name for p in parts] == [f"{tmp_path}:dev_matched", f"{tmp_path}:dev_mismatched"]
    assert [p.examples[0].label for p in parts] == [1, 2]


def test_source_mrpc_download_columns_and_row_ids(tmp_path: Path) -> None:
    from matekd_ds.data.sources import read_source

    write(tmp_path / "test.tsv",
          ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", '7\t1\t2\tA "quoted\tB.', "9\t3\t4\tC.\tD."])
    (rows,) = read_source(str(tmp_path / "test.tsv"), get_task("mrpc"), _choices("mrpc"), labeled=False)
    assert rows.ids == ["7", "9"]
    assert rows.examples[0].texts == ('A "quoted', "B.")


def test_source_names_the_missing_columns_and_what_names_them(tmp_path: Path) -> None:
    from matekd_ds.data.sources import read_source

    write(tmp_path / "x.csv", ["text,gold", "hi,1"])
    with pytest.raises(MatekdError, match=r"x.csv, line 2: no columns \[sentence, label\]; columns: text, gold "
                                          r"\(--text-columns/--label-column name them\)"):
        read_source(str(tmp_path / "x.csv"), get_task("sst2"), _choices("sst2"), labeled=True)
    (rows,) = read_source(str(tmp_path / "x.csv"), get_task("sst2"),
                          _choices("sst2", text_columns=["text"], label_column="gold"), labeled=True)
    assert rows.examples == [Example(("hi",), 1, 0)]


def test_source_hub_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from matekd_ds.data.sources import read_source

    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"sentence": "great", "label": 1, "idx": 5}]

    fake_datasets(monkeypatch, load_dataset)
    (rows,) = read_source("hub:nyu-mll/glue:sst2:validation", get_task("sst2"), _choices("sst2"), labeled=True)
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert rows.examples == [Example(("great",), 1, 0)] and rows.ids == ["5"]
    with pytest.raises(MatekdError, match=r"write hub:<dataset>\[:<config>\]:<split>"):
        read_source("hub:imdb", get_task("sst2"), _choices("sst2"), labeled=True)


def test_source_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from matekd_ds.data.sources import read_source

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'imdb' on the Hub\nmore")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(MatekdError,
                       match=r"^could not load hub:imdb:test from the hub: Couldn't reach 'imdb' on the Hub$"):
        read_source("hub:imdb:test", get_task("sst2"), _choices("sst2"), labeled=True)
