"""Bad input: one line on stderr naming the problem, a non-zero exit, no output directory."""

import json

import pytest
from helpers import GLUE, REPO, run_cli


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("matekd: error: "), result.stderr[-2000:]
    assert fragment in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["method=distill"], "method must be one of"),
    (["task=glue-ish"], "glue-ish"),
    (["task=sst2", "data.path=/does/not/exist"], "/does/not/exist"),
    (["deepspeed.student=zero9"], "unknown DeepSpeed preset 'zero9'"),
    (["method=kd", "deepspeed.teacher=zero2"], "deepspeed.teacher: preset zero2 has ZeRO stage 2"),
    (["models.teacher=/no/such/teacher"], "could not load the teacher from '/no/such/teacher'"),
    (["--config", "/no/such/run.yaml"], "config file not found"),
    (["train.lr=.inf"], "'train.lr' must be a finite number"),
    (["matekd.generator_lr=.nan"], "'matekd.generator_lr' must be a finite number"),
    (["train.lr=1e10"], "train.lr must be in (0, 1.0]"),
    (["data.max_length=600"], "data.max_length 600 is longer than the teacher's position embeddings allow (512"),
    (["models.student_init_from_teacher_layers=[0,9]"], "must pick layers in 0..3 (the teacher has 4)"),
])
def test_bad_input(tmp_path, args, fragment):
    out = tmp_path / "run"
    result = run_cli(["train", *args, f"output.dir={out}"], cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_vocabulary_mismatch(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    generator = tmp_path / "generator"
    BertForMaskedLM(BertConfig(vocab_size=77, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(generator)
    result = run_cli(["train", f"models.generator={generator}", f"output.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_one_line_error(result, "vocabulary mismatch")
    assert not (tmp_path / "run").exists()


def test_custom_data_errors_name_the_column(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"sentence": "fine", "label": "pos"}) + "\n")
    result = run_cli(["train", "task=custom", f"data.train_file={data}", f"data.dev_file={data}",
                      "data.label_names=[neg,pos]", f"output.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_one_line_error(result, "text")


def test_existing_output_dir_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "run"
    (out / "student").mkdir(parents=True)
    (out / "student" / "model.safetensors").write_text("precious")
    result = run_cli(["train", f"output.dir={out}"], cwd=tmp_path)
    assert_one_line_error(result, "already holds files")
    assert (out / "student" / "model.safetensors").read_text() == "precious"


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason="needs ../shared/data/glue")
def test_eval_of_a_non_run_directory_needs_a_task(tmp_path):
    result = run_cli(["eval", str(tmp_path)], cwd=REPO)
    assert_one_line_error(result, "not a run directory")


def test_output_dir_that_is_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a directory")
    assert_one_line_error(run_cli(["train", f"output.dir={out}"], cwd=tmp_path), "is a file, not a directory")
    assert out.read_text() == "not a directory"


@pytest.fixture(scope="module")
def six_label_teacher(tmp_path_factory):
    """A saved classifier with 6 labels and its tokenizer (the synthetic task has 2)."""
    from transformers import BertConfig, BertForSequenceClassification

    from matekd_ds.data import synthetic
    from matekd_ds.data.tokenizer import train_wordpiece

    folder = tmp_path_factory.mktemp("teacher6") / "teacher"
    tokenizer = train_wordpiece([t for ex in synthetic.generate(200, seed=3) for t in ex.texts], 400)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=6)
                                  ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_with_the_wrong_number_of_labels(tmp_path, six_label_teacher):
    out = tmp_path / "run"
    result = run_cli(["train", "method=kd", f"models.teacher={six_label_teacher}", f"output.dir={out}"], cwd=tmp_path)
    assert_one_line_error(result, "is a classifier with 6 labels, but the task has 2")
    assert not out.exists()


def test_a_truncated_weight_file(tmp_path, six_label_teacher):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(six_label_teacher, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((teacher / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "positive"}  # the label check passes; the weights cannot load
    (teacher / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    result = run_cli(["train", "method=kd", f"models.teacher={teacher}", f"output.dir={out}"], cwd=tmp_path)
    assert_one_line_error(result, f"could not load the teacher from '{teacher}'")
    assert not out.exists()


def test_unwritable_output_filesystem(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = run_cli(["train", f"output.dir={parent / 'run'}"], cwd=tmp_path)
    finally:
        parent.chmod(0o755)
    assert_one_line_error(result, "is not writable")


def test_overrides_may_follow_options():
    from matekd_ds import cli

    assert cli._parse(["train", "--resume", "train.lr=1e-4", "task=sst2"]).overrides == ["train.lr=1e-4", "task=sst2"]
    args = cli._parse(["eval", "runs/x", "--json", "task=sst2", "--max-examples", "5", "data.max_length=32"])
    assert args.overrides == ["task=sst2", "data.max_length=32"] and args.json and args.max_examples == 5
    args = cli._parse(["train", "data.path=d", "--resume", "output.dir=o"])  # argparse alone: "unrecognized"
    assert args.overrides == ["data.path=d", "output.dir=o"]
    for stray in (["train", "data.path=d", "--resume", "--bogus"], ["train", "x=1", "--resume", "notanoverride"],
                  ["experiment", "spec.yaml", "x=1"]):
        with pytest.raises(SystemExit) as exit_info:
            cli._parse(stray)
        assert exit_info.value.code == 2
