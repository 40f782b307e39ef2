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
