"""What a user does after training (issue 12), replayed on small local data and tiny models:
the defaults `matekd train` runs with, `matekd eval` on any labeled file, `matekd predict` (files
and GLUE test submissions), robustness on perturbed text, exports with class names and a model
card, and one-line errors for what goes wrong.

One tiny MATE-KD run (a 3-class custom task like TREC, a teacher given as a path, a generator
folder without tokenizer files) is trained once, without --config, and shared."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, matekd_in_process, run_cli
from test_cli import assert_one_line_error

from matekd_ds import cli, models
from matekd_ds.data import synthetic
from matekd_ds.data.tokenizer import train_wordpiece

LABELS = ["neg", "pos", "meh"]
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


# ---------------------------------------------------------------------------------------------
# Shared: data, models, one trained run


def _save_classifier(folder: Path, tokenizer, num_labels: int) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, **TINY)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data files (the same dev rows as a JSON array, JSON lines, quoted CSV and TSV; an unlabeled
    file), a 3-label teacher with its tokenizer, a generator folder without tokenizer files."""
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("after")
    examples = synthetic.generate(120, seed=7)
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "question": ex.texts[0], "label": LABELS[rng.randrange(3)]}
            for i, ex in enumerate(examples)]
    train, dev = rows[:80], rows[80:]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "dev.json").write_text(json.dumps(dev, indent=1))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    (root / "dev.tsv").write_text("id\tquestion\tlabel\n"
                                  + "".join(f"{r['id']}\t{r['question']}\t{r['label']}\n" for r in dev))
    with open(root / "dev.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "question", "label"], quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(dev)
    (root / "unlabeled.jsonl").write_text("".join(json.dumps({"id": r["id"], "question": r["question"]}) + "\n"
                                                  for r in dev))
    tokenizer = train_wordpiece([ex.texts[0] for ex in examples], 400)
    teacher = _save_classifier(root / "teacher", tokenizer, 3)
    generator = root / "generator"
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               **TINY)).save_pretrained(generator)
    return {"root": root, "dev": dev, "teacher": teacher, "generator": generator, "tokenizer": tokenizer}


CUSTOM = ["task=custom", "data.text_columns=[question]", "data.label_names=[neg,pos,meh]"]


@pytest.fixture(scope="module")
def trained(assets):
    """`matekd train` without --config on a custom task, the teacher a path: (run dir, result)."""
    root = assets["root"]
    out = root / "run"
    result = run_cli(["train", *CUSTOM, f"data.train_file={root / 'train.jsonl'}", f"data.dev_file={root / 'dev.json'}",
                      "method=matekd", f"models.teacher={assets['teacher']}", "models.student=builtin:bert-L1-H32-A2",
                      f"models.generator={assets['generator']}", "train.max_steps=2", "train.micro_batch_size=16",
                      "matekd.generator_steps=1", "matekd.student_steps=1", "data.max_eval_examples=10",
                      "logging.progress=false", f"output.dir={out}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def matekd(capfd, *args: str) -> tuple[int, str, str]:
    """`matekd ARGS` in this process: (exit code, stdout, stderr)."""
    return matekd_in_process(capfd, *args)


def matekd_json(capfd, *args: str) -> dict:
    code, out, err = matekd(capfd, *args, "--json")
    assert code == 0, err[-3000:]
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# 1. Defaults that mean what the README says


def test_train_without_config_runs_the_readme_defaults_and_never_fine_tunes_a_given_teacher(trained):
    run, result = trained
    assert "fine-tuning" not in result.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["max_length"] == 128
    assert saved["train"]["lr"] == 2e-5 and saved["train"]["warmup_ratio"] == 0.0
    assert saved["matekd"]["generator_lr"] == 5e-7
    assert saved["models"]["teacher_finetune_epochs"] == 0.0
    from matekd_ds.config import config_from_dict

    assert config_from_dict(saved).to_dict() == saved  # every value used is recorded, none left to defaults
    metrics = json.loads((run / "metrics.json").read_text())
    assert "teacher_finetune" not in metrics and not (run / "teacher").exists()


def test_the_demo_settings_apply_to_the_demo_only(capsys):
    from matekd_ds.config import load_config

    demo = cli.default_config_path()
    assert cli.run_config_path(None, []) == demo
    assert cli.run_config_path(None, ["train.lr=1e-3", "method=kd", "task=synthetic"]) == demo
    for real in (["task=sst2"], ["task=custom"], ["models.teacher=runs/x/teacher"], ["models.student=distilbert-base"]):
        assert cli.run_config_path(None, real) is None, real
    assert cli.run_config_path("my.yaml", ["task=sst2"]) == Path("my.yaml")
    assert load_config(cli.run_config_path(None, []), []).data.max_length == 48
    real = load_config(cli.run_config_path(None, ["task=sst2"]), ["task=sst2"])
    assert (real.data.max_length, real.train.lr, real.matekd.generator_lr) == (128, 2e-5, 5e-7)
    assert load_config(None, ["models.teacher=./t"]).models.teacher_finetune_epochs == 0.0

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "offline_default.yaml" in text and "otherwise the README's defaults" in text


# ---------------------------------------------------------------------------------------------
# 5. Exports: class names and a model card


def test_exports_name_their_classes_and_carry_a_model_card(trained, assets):
    from transformers import AutoConfig

    run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    for export in ("student", "student_best"):
        config = AutoConfig.from_pretrained(run / export)
        assert config.id2label == {0: "neg", 1: "pos", 2: "meh"} and config.label2id == {"neg": 0, "pos": 1, "meh": 2}
        card = (run / export / "README.md").read_text()
        _, front, body = card.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["pipeline_tag"] == "text-classification" and "matekd" in meta["tags"]
        (result,) = meta["model-index"][0]["results"]
        dev = metrics["final"] if export == "student" else metrics["best"]["dev"]
        assert result["metrics"][0] == {"type": "accuracy", "value": round(dev["dev"]["accuracy"], 4),
                                        "name": "dev accuracy (dev)"}
        for expected in (f"| teacher | `{assets['teacher']}`", "| learning rate | 2e-05 |", "| method | `matekd` |",
                         "## Training data", "## Evaluation results", "| task | `custom`: neg, pos, meh |"):
            assert expected in body, expected


# ---------------------------------------------------------------------------------------------
# 2. Evaluation on any file


def test_eval_json_is_pure_on_stdout_and_scores_the_whole_dev_set(trained):
    run, train_result = trained
    assert "dev 10;" in train_result.stderr  # the run selected on the first 10 dev examples
    result = run_cli(["eval", str(run), "--json"], cwd=run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)  # nothing but JSON on stdout
    assert results["examples"] == {"dev": 40}


def test_a_reloaded_student_reproduces_its_score(trained, capfd):
    run, _ = trained
    results = matekd_json(capfd, "eval", run, "--max-examples", "10")
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert results["examples"] == {"dev": 10}
    assert results["dev"]["dev"] == pytest.approx(final["dev"])


def test_eval_several_formats_give_one_table_with_per_class_scores(trained, assets, capfd):
    run, root = trained[0], assets["root"]
    files = [root / name for name in ("dev.csv", "dev.tsv", "dev.jsonl", "dev.json")]
    results = matekd_json(capfd, "eval", run, "--data", *files)
    assert list(results["dev"]) == [str(f) for f in files]
    gold = [LABELS.index(r["label"]) for r in assets["dev"]]
    reports = list(results["classes"].values())
    for name, report in zip(results["dev"], reports):
        assert results["dev"][name] == results["dev"][str(files[0])]
        assert report == reports[0]
        matrix = report["confusion_matrix"]
        assert [sum(row) for row in matrix] == [gold.count(c) for c in range(3)]
        assert sum(matrix[c][c] for c in range(3)) / 40 == pytest.approx(results["dev"][name]["accuracy"])
        assert [report["per_class"][c]["support"] for c in LABELS] == [gold.count(c) for c in range(3)]
    code, table, _ = matekd(capfd, "eval", run, "--data", *files)
    assert code == 0
    metric_rows = [line for line in table.splitlines() if line.startswith(str(root)) and "per class" not in line]
    assert len(metric_rows) == 4  # one table for the four files
    assert table.count("per class (rows: true class, columns: predicted)") == 4


def test_eval_a_model_outside_any_run_on_a_custom_file_needs_no_training_file(trained, assets, tmp_path, capfd):
    copy = tmp_path / "model"
    shutil.copytree(trained[0] / "student", copy)
    dev = assets["root"] / "dev.jsonl"
    alone = matekd_json(capfd, "eval", copy, *CUSTOM, f"data.dev_file={dev}")
    in_run = matekd_json(capfd, "eval", trained[0], "--data", dev)
    assert alone["examples"] == {str(dev): 40}
    assert alone["dev"][str(dev)] == in_run["dev"][str(dev)]


@pytest.fixture(scope="module")
def glue_models(assets):
    """Tiny saved classifiers with 1 (STS-B), 2 and 3 (MNLI) outputs and the shared tokenizer."""
    root = assets["root"] / "glue_models"
    return {n: _save_classifier(root / f"m{n}", assets["tokenizer"], n) for n in (1, 2, 3)}


def test_eval_a_glue_model_on_a_folder_with_only_dev_and_on_data_dev_file(glue_models, tmp_path, capfd):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "the film is good .\t1\n" * 3 + "the film is bad .\t0\n")
    (tmp_path / "other.tsv").write_text("sentence\tlabel\nthe plot was dull .\t0\nthe cast is great .\t1\n")
    results = matekd_json(capfd, "eval", glue_models[2], "task=sst2", f"data.path={folder}")
    assert results["examples"] == {"dev": 4}
    other = matekd_json(capfd, "eval", glue_models[2], "task=sst2", f"data.path={folder}",
                        f"data.dev_file={tmp_path / 'other.tsv'}")
    assert other["examples"] == {str(tmp_path / "other.tsv"): 2}


# ---------------------------------------------------------------------------------------------
# 6. One line and a non-zero exit


@pytest.fixture(scope="module")
def six_labels(assets):
    return _save_classifier(assets["root"] / "trec-teacher", assets["tokenizer"], 6)


def test_eval_of_a_model_with_the_wrong_number_of_labels(six_labels, tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze .\n")
    result = run_cli(["eval", str(six_labels), "task=cola", f"data.path={tmp_path}"], cwd=tmp_path)
    assert_one_line_error(result, f"the model '{six_labels}' is a classifier with 6 labels, but the task has 2")


def test_the_module_entry_point_loads_models_from_the_checkout_root(assets):
    """`python -m matekd_ds` (as `deepspeed --module` runs it) started in this repository's root:
    its kernels/ folder must not shadow Hugging Face's `kernels`, which transformers imports."""
    result = run_cli(["eval", str(assets["teacher"]), *CUSTOM, f"data.dev_file={assets['root'] / 'dev.jsonl'}",
                      "--json"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    dev = str(assets["root"] / "dev.jsonl")
    assert json.loads(result.stdout)["examples"] == {dev: 40}


def test_an_albert_generator_is_refused_before_the_teacher_is_fine_tuned(assets, tmp_path):
    from transformers import AlbertConfig, AlbertForMaskedLM

    albert = tmp_path / "albert"
    tokenizer = assets["tokenizer"]
    AlbertForMaskedLM(AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, pad_token_id=tokenizer.pad_token_id,
                                   **TINY)).save_pretrained(albert)
    root, out = assets["root"], tmp_path / "run"
    result = run_cli(["train", *CUSTOM, f"data.train_file={root / 'train.jsonl'}", f"data.dev_file={root / 'dev.json'}",
                      f"models.teacher={assets['teacher']}", "models.teacher_finetune_epochs=1",
                      f"models.generator={albert}", f"output.dir={out}"], cwd=tmp_path)
    assert_one_line_error(result, "unsupported generator architecture AlbertForMaskedLM")
    assert not out.exists()


def test_a_generator_folder_without_tokenizer_files_shares_the_vocabulary(assets, trained, tmp_path):
    from matekd_ds.errors import MatekdError

    generator = assets["generator"]
    assert not models.has_tokenizer_files(str(generator))  # and the shared run trained with it
    assert json.loads((trained[0] / "metrics.json").read_text())["status"] == "completed"
    models.check_tokenizers_agree({"generator": str(generator)}, assets["tokenizer"])
    other = tmp_path / "other"
    shutil.copytree(generator, other)
    train_wordpiece(["completely different words here"], 60).save_pretrained(other)
    with pytest.raises(MatekdError, match="has a different tokenizer vocabulary"):
        models.check_tokenizers_agree({"generator": str(other)}, assets["tokenizer"])


@pytest.mark.parametrize("args, fragment", [
    (["eval", "{run}", "--data", "{root}/missing.tsv"], "data file not found"),
    (["eval", "{run}", "--data", "{root}/dev.parquet"], "is not a readable Parquet file"),
    (["eval", "{run}", "--data", "{root}/dev.xlsx"], "unsupported table format '.xlsx'"),
    (["eval", "{run}", "--data", "{root}/unlabeled.jsonl"], "no columns [question, label]"),
    (["eval", "{run}", "--max-examples", "0"], "--max-examples must be >= 1"),
    (["eval", "{teacher}", "task=custom", "data.dev_file={root}/dev.jsonl", "data.text_columns=[question]",
      "data.label_names=[neg,pos,meh]", "--perturbed"], "--perturbed needs a generator"),
    (["predict", "{run}", "--data", "{root}/unlabeled.jsonl", "--out", "{tmp}/p.parquet"], "unknown format '.parquet'"),
    (["predict", "{run}", "--data", "{root}/unlabeled.jsonl", "--out", "{tmp}/no/such/p.tsv"], "does not exist"),
    (["predict", "{run}", "--glue-test", "{tmp}", "--out", "{tmp}/sub"], "the model's task is custom, not a GLUE task"),
])
def test_bad_eval_and_predict_input_is_one_line(trained, assets, tmp_path, capfd, args, fragment):
    (assets["root"] / "dev.parquet").write_text("x")
    (assets["root"] / "dev.xlsx").write_text("x")
    values = {"run": trained[0], "root": assets["root"], "tmp": tmp_path, "teacher": assets["teacher"]}
    code, out, err = matekd(capfd, *(a.format(**values) for a in args))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("matekd: error: ") and fragment in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------------
# 3. Predictions


def _read_predictions(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))
    return [{"id": r["id"], "label": r["label"], "probabilities": {c: float(r[f"prob_{c}"]) for c in LABELS}}
            for r in rows]


def test_predict_writes_ids_labels_and_probabilities_in_every_format(trained, assets, tmp_path, capfd):
    run, unlabeled = trained[0], assets["root"] / "unlabeled.jsonl"
    written = {}
    for suffix in (".tsv", ".csv", ".jsonl"):
        out = tmp_path / f"predictions{suffix}"
        code, stdout, err = matekd(capfd, "predict", run, "--data", unlabeled, "--out", out)
        assert code == 0, err
        assert "wrote 40 predictions" in stdout
        written[suffix] = _read_predictions(out)
    rows = written[".jsonl"]
    assert [r["id"] for r in rows] == [r["id"] for r in assets["dev"]]
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    for suffix in (".tsv", ".csv"):
        assert [r["label"] for r in written[suffix]] == [r["label"] for r in rows]
        for a, b in zip(written[suffix], rows):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    # the same model on the same rows, labeled: eval's confusion matrix counts these predictions
    matrix = matekd_json(capfd, "eval", run, "--data", assets["root"] / "dev.jsonl")["classes"]
    (report,) = matrix.values()
    predicted = [sum(row[c] for row in report["confusion_matrix"]) for c in range(3)]
    assert predicted == [sum(r["label"] == c for r in rows) for c in LABELS]
    assert not list(tmp_path.glob(".*partial"))


def test_predict_on_two_ranks_equals_one_rank(trained, assets, tmp_path, capfd):
    run, unlabeled = trained[0], assets["root"] / "unlabeled.jsonl"
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert matekd(capfd, "predict", run, "--data", unlabeled, "--out", one)[0] == 0
    result = run_cli(["predict", str(run), "--data", str(unlabeled), "--out", str(two)], cwd=tmp_path, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 40 predictions of {run / 'student'} (custom) to {two} on 2 rank(s)" in result.stdout
    a, b = _read_predictions(one), _read_predictions(two)
    assert [(r["id"], r["label"]) for r in a] == [(r["id"], r["label"]) for r in b]
    for x, y in zip(a, b):
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-6)


# The GLUE test sets' layouts (the GLUE download's test.tsv headers) and the submission rules.
GLUE_TEST_FILES = {
    "CoLA/test.tsv": ["index", "sentence"],
    "SST-2/test.tsv": ["index", "sentence"],
    "MRPC/test.tsv": ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "STS-B/test.tsv": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2"],
    "QQP/test.tsv": ["id", "question1", "question2"],
    "MNLI/test_matched.tsv": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"],
    "QNLI/test.tsv": ["index", "question", "sentence"],
    "RTE/test.tsv": ["index", "sentence1", "sentence2"],
    "WNLI/test.tsv": ["index", "sentence1", "sentence2"],
    "diagnostic/diagnostic.tsv": ["index", "sentence1", "sentence2"],
}
GLUE_TEST_FILES["MNLI/test_mismatched.tsv"] = GLUE_TEST_FILES["MNLI/test_matched.tsv"]
SUBMISSION_RULES = {  # file -> (test file, allowed predictions; None: a score in [0, 5])
    "CoLA.tsv": ("CoLA/test.tsv", {"0", "1"}), "SST-2.tsv": ("SST-2/test.tsv", {"0", "1"}),
    "MRPC.tsv": ("MRPC/test.tsv", {"0", "1"}), "STS-B.tsv": ("STS-B/test.tsv", None),
    "QQP.tsv": ("QQP/test.tsv", {"0", "1"}),
    "MNLI-m.tsv": ("MNLI/test_matched.tsv", {"entailment", "neutral", "contradiction"}),
    "MNLI-mm.tsv": ("MNLI/test_mismatched.tsv", {"entailment", "neutral", "contradiction"}),
    "AX.tsv": ("diagnostic/diagnostic.tsv", {"entailment", "neutral", "contradiction"}),
    "QNLI.tsv": ("QNLI/test.tsv", {"entailment", "not_entailment"}),
    "RTE.tsv": ("RTE/test.tsv", {"entailment", "not_entailment"}),
    "WNLI.tsv": ("WNLI/test.tsv", {"0", "1"}),
}


def _glue_test_folder(root: Path) -> None:
    sentences = ["the film is good .", "it was not bad , but dull .", 'a "quoted" ending']
    for n, (path, header) in enumerate(GLUE_TEST_FILES.items()):
        rows = []
        for i in range(3 + n % 4):  # a different size per file
            cells = {name: sentences[(i + j) % 3] for j, name in enumerate(header)}
            cells[header[0]] = str(100 + i)  # indices are the file's, not row numbers
            rows.append("\t".join(cells[name] for name in header))
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("\t".join(header) + "\n" + "\n".join(rows) + "\n")


def check_glue_submission(submission: Path, test_root: Path) -> list[str]:
    """The GLUE leaderboard's format: the eleven file names, header `index<TAB>prediction`, one row
    per test example with its index, predictions in each task's label vocabulary."""
    problems = []
    if sorted(p.name for p in submission.iterdir()) != sorted(SUBMISSION_RULES):
        problems.append(f"files: {sorted(p.name for p in submission.iterdir())}")
    for name, (test_file, allowed) in SUBMISSION_RULES.items():
        lines = (submission / name).read_text().split("\n")
        test_lines = (test_root / test_file).read_text().splitlines()[1:]
        if lines[0] != "index\tprediction" or lines[-1] != "":
            problems.append(f"{name}: header {lines[0]!r} or no final newline")
        rows = [line.split("\t") for line in lines[1:-1]]
        if [r[0] for r in rows] != [t.split("\t")[0] for t in test_lines]:
            problems.append(f"{name}: {len(rows)} rows, indices differ from {test_file} ({len(test_lines)} rows)")
        for index, prediction in rows:
            ok = (allowed is None and prediction.count(".") == 1 and len(prediction.split(".")[1]) == 3
                  and 0.0 <= float(prediction) <= 5.0) or (allowed is not None and prediction in allowed)
            if not ok:
                problems.append(f"{name}: row {index}: prediction {prediction!r}")
    return problems


def test_glue_test_submission_passes_the_format_check(glue_models, tmp_path, capfd):
    test_root, submission = tmp_path / "glue", tmp_path / "submission"
    _glue_test_folder(test_root)
    tasks = {"cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}
    for task, outputs in tasks.items():
        code, out, err = matekd(capfd, "predict", glue_models[outputs], f"task={task}", "--glue-test", test_root,
                                "--out", submission, "--force")  # a few rows per test file, not GLUE's
        assert code == 0, err
    assert "all 11 GLUE files are there" in out
    assert check_glue_submission(submission, test_root) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glue", "submission"]  # no staging folder left


def test_glue_test_without_the_task_test_file_writes_nothing(glue_models, tmp_path, capfd):
    (tmp_path / "RTE").mkdir()
    code, _, err = matekd(capfd, "predict", glue_models[2], "task=rte", "--glue-test", tmp_path,
                          "--out", tmp_path / "sub")
    assert code == 2 and "no rte test file" in err and not (tmp_path / "sub").exists()


# ---------------------------------------------------------------------------------------------
# 4. Robustness


def test_perturbed_eval_puts_clean_and_perturbed_side_by_side(trained, assets, tmp_path, capfd):
    run = trained[0]
    first = matekd_json(capfd, "eval", run, "--perturbed")
    again = matekd_json(capfd, "eval", run, "--perturbed")
    robust = first["robustness"]
    assert robust == again["robustness"]  # a fixed seed: the same perturbed text, the same numbers
    assert robust["settings"] == {"generator": f"{assets['generator']}", "mask_prob": 0.3, "tau": 1.0, "seed": 0}
    assert robust["teacher"] == str(assets["teacher"])
    dev = robust["splits"]["dev"]
    assert dev["clean"]["model"]["accuracy"] == first["dev"]["dev"]["accuracy"]
    assert 0.2 < dev["changed_token_fraction"] < 0.4  # 30% of the real tokens masked, nearly all rewritten
    assert set(dev["perturbed"]) == {"model", "teacher", "agreement", "kl"}
    # recorded in the run and in its model card
    assert json.loads((run / "robustness.json").read_text())["splits"] == robust["splits"]
    assert "## Robustness" in (run / "student" / "README.md").read_text()
    # the clean agreement and KL are what the two models' predicted distributions say
    predicted = {}
    for who, model in (("student", run), ("teacher", assets["teacher"])):
        out = tmp_path / f"{who}.jsonl"
        extra = [] if who == "student" else [*CUSTOM]
        assert matekd(capfd, "predict", model, *extra, "--data", assets["root"] / "unlabeled.jsonl",
                      "--out", out)[0] == 0
        predicted[who] = _read_predictions(out)
    pairs = list(zip(predicted["student"], predicted["teacher"]))
    assert dev["clean"]["agreement"] == pytest.approx(sum(s["label"] == t["label"] for s, t in pairs) / 40)
    kl = [sum(p * (math.log(p) - math.log(s["probabilities"][c])) for c, p in t["probabilities"].items())
          for s, t in pairs]
    assert dev["clean"]["kl"] == pytest.approx(sum(kl) / 40, rel=1e-5)
    different = matekd_json(capfd, "eval", run, "--perturbed", "--seed", "1")["robustness"]["splits"]["dev"]
    assert different["changed_token_fraction"] != dev["changed_token_fraction"]


def test_perturbed_eval_on_two_ranks_equals_one_rank(trained, assets, tmp_path, capfd):
    """320 rows: three blocks of perturbation (robustness.BLOCK), shared out over the two ranks."""
    run, many = trained[0], tmp_path / "many.jsonl"
    many.write_text((assets["root"] / "dev.jsonl").read_text() * 8)
    one = matekd_json(capfd, "eval", run, "--data", many, "--perturbed", "--mask-prob", "0.5")
    result = run_cli(["eval", str(run), "--data", str(many), "--perturbed", "--mask-prob", "0.5",
                      "--output", str(tmp_path / "two.json")], cwd=tmp_path, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["robustness"]["settings"]["mask_prob"] == 0.5
    assert _flat(two["robustness"]["splits"]) == pytest.approx(_flat(one["robustness"]["splits"]), abs=1e-6)


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"a.b": value} of nested dicts (pytest.approx compares flat ones)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Logs and the progress bar


def test_log_lines_never_land_in_the_progress_bar_line():
    import io
    import logging

    from tqdm import tqdm

    from matekd_ds.monitor import ConsoleHandler

    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, mininterval=0, ascii=True, ncols=50)
    bar.update(3)
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("[matekd] %(message)s"))
    logger = logging.getLogger("matekd.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("step 5/10: dev accuracy 0.5")
    bar.update(1)
    bar.close()
    segments = stream.getvalue().replace("\r", "\n").split("\n")
    assert "[matekd] step 5/10: dev accuracy 0.5" in segments  # a line of its own, not the bar's tail
