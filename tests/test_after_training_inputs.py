"""What users hand `matekd` after (and before) training, replayed at the command line (issue 24,
points 1-3): GLUE test files checked against the task's before a submission is written; AdvGLUE's
JSON object of sets, headerless CSV/TSV, Parquet and `save_to_disk` folders read for eval,
predict and train; no silent demo run, no "cannot reach the hub" for a mistyped path, no
subset's robustness over a whole set's, and an unfinished run's errors saying how to finish it.

Tiny models and a few rows; three short training runs in subprocesses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import matekd_in_process, run_cli
from test_after_training import GLUE_TEST_FILES
from test_cli import assert_one_line_error

from matekd_ds.data import synthetic
from matekd_ds.data.tokenizer import train_wordpiece

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TINY_MODELS = ["models.teacher=builtin:bert-L1-H32-A2", "models.student=builtin:bert-L1-H32-A2",
               "models.generator=builtin:bert-L1-H32-A2", "models.teacher_finetune_epochs=0",
               "models.builtin_tokenizer_vocab_size=300", "data.max_length=32"]
SHORT_RUN = ["train.max_steps=2", "train.micro_batch_size=16", "matekd.generator_steps=1", "matekd.student_steps=1",
             "logging.progress=false", "output.checkpoint_every=1"]


def matekd(capfd, *args) -> tuple[int, str, str]:
    """`matekd ARGS` in this process: (exit code, stdout, stderr)."""
    return matekd_in_process(capfd, *args)


def one_line_error(capfd, *args) -> str:
    code, out, err = matekd(capfd, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "", err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("matekd: error: "), err[-2000:]
    return lines[0]


def assert_error_after_notes(result, fragment: str) -> None:
    """Exit 2 and one error line, after nothing but notes: `[matekd]` ones (the task a folder
    names) and DeepSpeed's import-time accelerator warning (not this test's subject)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("matekd: error: ") and fragment in lines[-1], result.stderr[-2000:]
    assert all(line.startswith("[matekd] ") or "[real_accelerator.py" in line for line in lines[:-1]), \
        result.stderr[-2000:]


def ok_json(capfd, *args) -> dict:
    code, out, err = matekd(capfd, *args, "--json")
    assert code == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def rows():
    """80 labeled sentences: [(sentence, label)]."""
    return [(ex.texts[0], ex.label) for ex in synthetic.generate(80, seed=11)]


@pytest.fixture(scope="module")
def sst2_model(tmp_path_factory, rows):
    """A tiny saved 2-class classifier with its tokenizer: a model outside any run."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("model") / "sst2-model"
    tokenizer = train_wordpiece([text for text, _ in rows] + ["who what where is"], 300)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=2, **TINY)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tsv(path: Path, header: list[str] | None, lines: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [header] if header else []
    path.write_text("".join("\t".join(cells) + "\n" for cells in body + lines))
    return path


# ---------------------------------------------------------------------------------------------
# 1. --glue-test: the test file must be the task's, whole


def test_glue_test_formats_are_the_downloads():
    from matekd_ds.glue_submission import SUBMISSION_FILES, TEST_FORMATS

    files = {"CoLA.tsv": "CoLA/test.tsv", "SST-2.tsv": "SST-2/test.tsv", "MRPC.tsv": "MRPC/test.tsv",
             "STS-B.tsv": "STS-B/test.tsv", "QQP.tsv": "QQP/test.tsv", "MNLI-m.tsv": "MNLI/test_matched.tsv",
             "MNLI-mm.tsv": "MNLI/test_mismatched.tsv", "AX.tsv": "diagnostic/diagnostic.tsv",
             "QNLI.tsv": "QNLI/test.tsv", "RTE.tsv": "RTE/test.tsv", "WNLI.tsv": "WNLI/test.tsv"}
    assert {name for pairs in SUBMISSION_FILES.values() for name, _ in pairs} == set(TEST_FORMATS) == set(files)
    for name, test_file in files.items():
        assert list(TEST_FORMATS[name][0]) == GLUE_TEST_FILES[test_file], name
    sizes = {name: n for name, (_, n) in TEST_FORMATS.items()}
    assert sizes == {"CoLA.tsv": 1063, "SST-2.tsv": 1821, "MRPC.tsv": 1725, "STS-B.tsv": 1379, "QQP.tsv": 390965,
                     "MNLI-m.tsv": 9796, "MNLI-mm.tsv": 9847, "QNLI.tsv": 5463, "RTE.tsv": 3000, "WNLI.tsv": 146,
                     "AX.tsv": 1104}


def test_glue_test_refuses_another_tasks_test_file_and_a_short_one(sst2_model, rows, tmp_path, capfd):
    qnli = tmp_path / "QNLI"
    write_tsv(qnli / "test.tsv", ["index", "question", "sentence"],
              [[str(i), "what is it ?", rows[i % 80][0]] for i in range(40)])
    out = tmp_path / "sub"
    for force in ([], ["--force"]):  # --force skips the row count only
        line = one_line_error(capfd, "predict", sst2_model, "task=sst2", "--glue-test", qnli, "--out", out, *force)
        assert (f"{qnli / 'test.tsv'} has columns [index, question, sentence], GLUE's SST-2 test set has "
                "[index, sentence] (it looks like QNLI's test file)") in line
    short = tmp_path / "SST-2"
    write_tsv(short / "test.tsv", ["index", "sentence"], [[str(i), rows[i % 80][0]] for i in range(872)])
    line = one_line_error(capfd, "predict", sst2_model, "task=sst2", "--glue-test", short, "--out", out)
    assert f"{short / 'test.tsv'} has 872 rows, GLUE's SST-2 test set has 1821; --force" in line
    assert not out.exists()  # nothing written

    code, stdout, err = matekd(capfd, "predict", sst2_model, "task=sst2", "--glue-test", short, "--out", out, "--force")
    assert code == 0, err
    assert "SST-2.tsv (872 of GLUE's 1821 rows)" in stdout and "--force: row counts not GLUE's" in stdout
    assert len((out / "SST-2.tsv").read_text().splitlines()) == 873


def test_glue_test_accepts_a_whole_test_file(sst2_model, rows, tmp_path, capfd):
    whole = tmp_path / "SST-2"
    write_tsv(whole / "test.tsv", ["index", "sentence"], [[str(i), rows[i % 80][0]] for i in range(1821)])
    summary = ok_json(capfd, "predict", sst2_model, "task=sst2", "--glue-test", whole, "--out", tmp_path / "sub")
    assert summary["written"]["SST-2.tsv"]["rows"] == 1821 and summary["forced"] is False
    line = one_line_error(capfd, "predict", sst2_model, "task=sst2", "--data", whole / "test.tsv",
                          "--out", tmp_path / "p.tsv", "--force")
    assert "--force is for --glue-test" in line


# ---------------------------------------------------------------------------------------------
# 2. Common file shapes: a JSON object of sets, headerless tables, Parquet, save_to_disk


def test_a_json_object_of_sets_is_read_by_key(sst2_model, rows, tmp_path, capfd):
    """AdvGLUE's dev.json: {"sst2": [...], "qnli": [...]}, pretty-printed."""
    adv = tmp_path / "dev.json"
    adv.write_text(json.dumps({
        "sst2": [{"sentence": text, "label": label, "idx": 100 + i} for i, (text, label) in enumerate(rows[:12])],
        "qnli": [{"question": "what ?", "sentence": text, "label": label, "idx": i} for i, (text, label)
                 in enumerate(rows[:5])]}, indent=2))
    line = one_line_error(capfd, "eval", sst2_model, "task=sst2", "--data", adv)
    assert f"{adv} is one JSON object with keys sst2, qnli; pick its rows with {adv}:KEY" in line
    assert ok_json(capfd, "eval", sst2_model, "task=sst2", "--data", f"{adv}:sst2")["examples"] == {f"{adv}:sst2": 12}
    assert f"{adv} has no key 'mnli'; keys: sst2, qnli" in one_line_error(
        capfd, "eval", sst2_model, "task=sst2", "--data", f"{adv}:mnli")
    out = tmp_path / "p.jsonl"
    assert matekd(capfd, "predict", sst2_model, "task=qnli", "--data", f"{adv}:qnli", "--out", out)[0] == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0", "1", "2", "3", "4"]


def test_headerless_tsv_and_csv_for_eval_and_predict(sst2_model, rows, tmp_path, capfd):
    tsv = write_tsv(tmp_path / "dev.tsv", None, [[text, str(label)] for text, label in rows[:10]])
    results = ok_json(capfd, "eval", sst2_model, "task=sst2", "--data", tsv, "--no-header",
                      "--text-columns", "0", "--label-column", "1")
    assert results["examples"] == {str(tsv): 10}  # the first line is a row, not a header
    with_header = tmp_path / "named.tsv"
    with_header.write_text("sentence\tlabel\n" + tsv.read_text())
    assert ok_json(capfd, "eval", sst2_model, "task=sst2", "--data", with_header)["dev"][str(with_header)] \
        == results["dev"][str(tsv)]
    assert "--no-header: name the columns by number from 0" in one_line_error(
        capfd, "eval", sst2_model, "task=sst2", "--data", tsv, "--no-header")

    headerless_csv = tmp_path / "unlabeled.csv"
    with open(headerless_csv, "w", newline="") as handle:
        csv.writer(handle).writerows([[f"q{i}", text] for i, (text, _) in enumerate(rows[:7])])
    out = tmp_path / "p.jsonl"
    code, _, err = matekd(capfd, "predict", sst2_model, "task=sst2", "--data", headerless_csv, "--no-header",
                          "--text-columns", "1", "--id-column", "0", "--out", out)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"q{i}" for i in range(7)]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory, rows):
    """The same 16 dev rows as a Parquet file, a saved Dataset, and a saved DatasetDict of GLUE
    SST-2's shape (train, validation)."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    table = {"sentence": [t for t, _ in rows], "label": [label for _, label in rows], "idx": list(range(80))}
    full = datasets.Dataset.from_dict(table)
    dev = full.select(range(64, 80))
    dev.to_parquet(str(root / "dev.parquet"))
    full.select(range(64)).to_parquet(str(root / "train.parquet"))
    dev.save_to_disk(str(root / "dev_saved"))
    datasets.DatasetDict({"train": full.select(range(64)), "validation": dev}).save_to_disk(str(root / "sst2"))
    return root


def test_parquet_and_saved_datasets_for_eval_and_predict(sst2_model, hf_files, tmp_path, capfd):
    root = hf_files
    parquet = ok_json(capfd, "eval", sst2_model, "task=sst2", "--data", root / "dev.parquet")
    scores = parquet["dev"][str(root / "dev.parquet")]
    assert parquet["examples"] == {str(root / "dev.parquet"): 16}
    for source in (root / "dev_saved", f"{root / 'sst2'}:validation", root / "sst2"):
        assert ok_json(capfd, "eval", sst2_model, "task=sst2", "--data", source)["dev"][str(source)] == scores
    # a GLUE task's saved DatasetDict is a GLUE folder: data.path reads its validation split
    assert ok_json(capfd, "eval", sst2_model, "task=sst2", f"data.path={root / 'sst2'}")["dev"]["dev"] == scores
    line = one_line_error(capfd, "eval", sst2_model, "task=custom", "data.text_columns=[sentence]",
                          "data.label_names=[negative,positive]", "--data", root / "sst2")
    assert f"{root / 'sst2'} is a saved DatasetDict with splits train, validation; pick one with" in line
    out = tmp_path / "p.tsv"
    code, stdout, err = matekd(capfd, "predict", sst2_model, "task=sst2", "--data", f"{root / 'sst2'}:validation",
                               "--out", out)
    assert code == 0 and "wrote 16 predictions" in stdout, err
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == [str(i) for i in range(64, 80)]


def test_train_reads_parquet_and_a_saved_dataset(hf_files, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "task=custom", "method=ft", "data.text_columns=[sentence]",
                      "data.label_names=[negative,positive]", f"data.train_file={hf_files / 'train.parquet'}",
                      f"data.dev_file={hf_files / 'sst2'}:validation", *TINY_MODELS, *SHORT_RUN,
                      f"output.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 train examples, dev 16" in result.stderr


def test_train_eval_and_predict_on_headerless_files(rows, tmp_path, capfd):
    train = write_tsv(tmp_path / "train.tsv", None, [[str(label), text] for text, label in rows[:64]])
    dev = write_tsv(tmp_path / "dev.tsv", None, [[str(label), text] for text, label in rows[64:]])
    out = tmp_path / "run"
    custom = ["task=custom", "method=ft", "data.no_header=true", "data.text_columns=[1]", "data.label_column=0",
              "data.label_names=[negative,positive]"]
    result = run_cli(["train", *custom, f"data.train_file={train}", f"data.dev_file={dev}", *TINY_MODELS, *SHORT_RUN,
                      f"output.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 train examples, dev 16" in result.stderr
    # the run's own numbered columns apply to files like its own
    assert ok_json(capfd, "eval", out, "--data", dev)["examples"] == {str(dev): 16}
    code, _, err = matekd(capfd, "predict", out, "--data", dev, "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    bad = run_cli(["train", *custom[:3], "data.label_names=[negative,positive]", f"data.train_file={train}",
                   f"data.dev_file={dev}", f"output.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert_one_line_error(bad, "data.no_header: name the columns by number from 0")


# ---------------------------------------------------------------------------------------------
# 3. Nothing silent or misleading


@pytest.fixture(scope="module")
def sst2_folder(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("glue")
    folder = root / "SST-2"
    write_tsv(folder / "train.tsv", ["sentence", "label"], [[t, str(y)] for t, y in rows[:64]])
    write_tsv(folder / "dev.tsv", ["sentence", "label"], [[t, str(y)] for t, y in rows[64:]])
    write_tsv(root / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "a", "b", "entailment"]])
    return folder


@pytest.fixture(scope="module")
def finished_after_interruption(sst2_folder, tmp_path_factory):
    """`matekd train data.path=.../SST-2` (no task=) stopped by SIGTERM once its directory is
    open; the errors that run gets; then finished with the command eval's error names."""
    cwd = tmp_path_factory.mktemp("interrupted")
    out = cwd / "run"
    command = ["train", f"data.path={sst2_folder}", *TINY_MODELS, *SHORT_RUN, f"output.dir={out}"]
    stopped = run_cli(command, cwd=cwd, env={"MATEKD_FAULT_AT": "opened:sigterm"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"[matekd] task=sst2, from the name of data.path {sst2_folder}" in stopped.stderr
    again = run_cli(command, cwd=cwd)
    seen = {"stopped": stopped, "again": again,
            "eval": run_cli(["eval", str(out)], cwd=cwd)}
    resume = ["train", "--resume", "--config", str(out / "config.yaml"), f"output.dir={out}"]
    finished = run_cli(resume, cwd=cwd)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, seen


def test_data_path_without_task_is_the_folders_task_or_an_error(finished_after_interruption, sst2_folder, tmp_path):
    run, _ = finished_after_interruption
    assert yaml.safe_load((run / "config.yaml").read_text())["task"] == "sst2"
    assert json.loads((run / "metrics.json").read_text())["task"] == "sst2"
    root = sst2_folder.parent
    assert_one_line_error(run_cli(["train", f"data.path={root}", f"output.dir={tmp_path / 'r'}"], cwd=tmp_path),
                          f"data.path {root} given without task=; which GLUE task is it?")
    assert_one_line_error(run_cli(["train", "task=synthetic", f"data.path={sst2_folder}",
                                   f"output.dir={tmp_path / 'r'}"], cwd=tmp_path),
                          "data.path is a GLUE task's folder; task synthetic does not read it")
    assert not (tmp_path / "r").exists()


def test_an_unfinished_run_says_how_to_finish_it(finished_after_interruption, sst2_folder):
    run, seen = finished_after_interruption
    assert_error_after_notes(seen["again"], f"output directory {run} already holds files of an unfinished run "
                                            "(status: interrupted); finish it by running the same command with "
                                            "--resume")
    assert_one_line_error(seen["eval"], f"{run} is an unfinished run without a student export yet (status: "
                                        f"interrupted); finish it with `matekd train --resume --config "
                                        f"{run / 'config.yaml'} output.dir={run}`")
    # ... which is what the fixture ran to finish it
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    completed = run_cli(["train", f"data.path={sst2_folder}", "task=sst2", *TINY_MODELS, f"output.dir={run}"],
                        cwd=run.parent)
    assert_error_after_notes(completed, "already holds files of a completed run; choose another output.dir")


def test_a_missing_path_is_named_not_looked_up_on_the_hub(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in ("runs/does-not-exist", "./nope", "~/matekd-no-such-model", str(tmp_path / "a" / "b")):
        for command in (["eval", missing, "task=sst2"],
                        ["predict", missing, "task=sst2", "--data", "x.tsv", "--out", "p.tsv"]):
            line = one_line_error(capfd, *command)
            assert line == f"matekd: error: no such run or model directory: {missing}", line
    from matekd_ds.evaluation_cli import looks_like_a_path

    assert not looks_like_a_path("textattack/bert-base-uncased-SST-2") and not looks_like_a_path("bert-base-uncased")


def test_a_subset_never_replaces_whole_set_robustness(finished_after_interruption, capfd):
    run, _ = finished_after_interruption
    record = run / "robustness.json"
    subset = ok_json(capfd, "eval", run, "--perturbed", "--max-examples", "5")["robustness"]
    assert (subset["examples"], subset["set_sizes"], subset["whole_sets"]) == ({"dev": 5}, {"dev": 16}, False)
    assert json.loads(record.read_text())["examples"] == {"dev": 5}  # nothing better was there
    whole = ok_json(capfd, "eval", run, "--perturbed")["robustness"]
    assert json.loads(record.read_text()) == whole and whole["whole_sets"] is True
    card = (run / "student" / "README.md").read_text()

    code, _, err = matekd(capfd, "eval", run, "--perturbed", "--max-examples", "5")
    assert code == 0 and "robustness of 5 of 16 examples not recorded" in err and "--record" in err
    assert json.loads(record.read_text()) == whole and (run / "student" / "README.md").read_text() == card
    assert ok_json(capfd, "eval", run, "--perturbed", "--max-examples", "5", "--record")["robustness"]["whole_sets"] \
        is False
    assert json.loads(record.read_text())["examples"] == {"dev": 5}
