"""End to end through the CLI: 2-rank `deepspeed` launches on CPU (ZeRO-2) of ft, kd and matekd
on real SST-2 data, the exported student, 1-rank vs 2-rank evaluation, and crash/resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GLUE, child_env, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason="needs ../shared/data/glue")

SST2_SMALL = [
    "task=sst2", f"data.path={GLUE / 'SST-2'}", "data.max_train_examples=160", "data.max_eval_examples=63",
    "data.max_length=48", "models.teacher_finetune_epochs=1", "models.teacher_finetune_lr=1e-3",
    "train.max_steps=8", "train.micro_batch_size=8", "train.lr=1e-3", "matekd.generator_steps=2",
    "matekd.student_steps=2", "matekd.generator_lr=1e-3", "eval.every_steps=4", "eval.batch_size=16",
    "output.checkpoint_every=4", "logging.log_every=2", "logging.progress=false",
]


def _train(tmp_path: Path, name: str, extra: list[str], ranks: int, env: dict | None = None):
    out = tmp_path / name
    result = run_cli(["train", *SST2_SMALL, *extra, f"output.dir={out}"], cwd=tmp_path, ranks=ranks, env=env)
    return out, result


@pytest.fixture(scope="module")
def matekd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matekd2")
    out, result = _train(tmp, "run", ["method=matekd", "train.dtype=fp32", "deepspeed.student=zero2",
                                      "deepspeed.generator=zero2"], ranks=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_matekd_two_ranks_zero2_writes_a_complete_run(matekd_run):
    m = _metrics(matekd_run)
    assert m["status"] == "completed" and m["world_size"] == 2 and m["method"] == "matekd"
    assert [e["step"] for e in m["evaluations"]] == [4, 8]
    assert m["best"]["dev"]["dev"]["main"] == max(e["dev"]["dev"]["main"] for e in m["evaluations"])
    assert 0.0 <= m["final"]["dev"]["accuracy"] <= 1.0
    assert "teacher_finetune" in m and m["teacher"]["dev"]["dev"]["accuracy"] > 0
    for path in ("config.yaml", "logs/train.log", "logs/scalars.csv", "teacher/config.json",
                 "student/config.json", "student_best/config.json", "checkpoints/student/LATEST",
                 "checkpoints/student/student/step_00000008", "checkpoints/student/generator/step_00000008"):
        assert (matekd_run / path).exists(), path
    names = {line.split(",")[1] for line in (matekd_run / "logs/scalars.csv").read_text().splitlines()[1:]}
    assert {"generator/gen_div", "student/loss", "student/div_perturbed", "student_eval/dev_accuracy"} <= names


def test_exported_student_reloads_with_transformers(matekd_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from matekd_ds.data.glue import get_task
    from matekd_ds.data.loaders import load_glue_dir
    from matekd_ds.metrics import task_metrics

    model = AutoModelForSequenceClassification.from_pretrained(matekd_run / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(matekd_run / "student")
    dev = load_glue_dir(get_task("sst2"), GLUE / "SST-2", "dev")[:63]
    enc = tokenizer([ex.texts[0] for ex in dev], truncation=True, max_length=48, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    accuracy = task_metrics(get_task("sst2"), logits, np.array([ex.label for ex in dev]))["accuracy"]
    assert accuracy == pytest.approx(_metrics(matekd_run)["final"]["dev"]["accuracy"])


def test_two_rank_evaluation_equals_one_rank(matekd_run, tmp_path):
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        result = run_cli(["eval", str(matekd_run), "--max-examples", "63", "--output", str(out)],
                         cwd=tmp_path, ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        results[ranks] = json.loads(out.read_text())
    assert results[1]["examples"] == results[2]["examples"] == {"dev": 63}
    assert results[2]["world_size"] == 2
    assert results[1]["dev"] == results[2]["dev"]


@pytest.mark.parametrize("method", ["ft", "kd"])
def test_ft_and_kd_two_ranks_zero2_bf16(method, tmp_path):
    out, result = _train(tmp_path, method, [f"method={method}", "train.dtype=bf16",
                                            "models.teacher_finetune_epochs=0.5"], ranks=2)
    assert result.returncode == 0, result.stderr[-4000:]
    m = _metrics(out)
    assert m["status"] == "completed" and m["dtype"] == "bf16" and m["student"]["steps"] == 8
    assert (out / "student" / "config.json").is_file()


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    common = ["task=synthetic", "data.synthetic.train_size=320", "data.synthetic.dev_size=50",
              "models.teacher_finetune_epochs=0.25", "models.teacher_finetune_lr=1e-3",
              "train.max_steps=12", "train.micro_batch_size=8", "train.gradient_accumulation_steps=2",
              "train.lr=1e-3", "matekd.generator_steps=2", "matekd.student_steps=3", "matekd.generator_lr=1e-3",
              "eval.every_steps=4", "output.checkpoint_every=3", "logging.log_every=1", "logging.progress=false"]
    whole = tmp_path / "whole"
    assert run_cli(["train", *common, f"output.dir={whole}"], cwd=tmp_path).returncode == 0
    broken = tmp_path / "broken"
    crashed = run_cli(["train", *common, f"output.dir={broken}"], cwd=tmp_path,
                      env={"MATEKD_CRASH_AFTER_STEP": "7"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert (broken / "checkpoints/student/LATEST").read_text() == "step_00000006"
    resumed = run_cli(["train", "--resume", *common, f"output.dir={broken}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed at step 6" in resumed.stderr

    a, b = load_file(whole / "student/model.safetensors"), load_file(broken / "student/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = _metrics(whole), _metrics(broken)
    assert ma["evaluations"] == mb["evaluations"]
    assert ma["teacher"]["dev"] == mb["teacher"]["dev"]


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["task=synthetic", "data.synthetic.train_size=200", "data.synthetic.dev_size=20",
            "models.teacher_finetune_epochs=0.1", "train.max_steps=100000", "train.micro_batch_size=4",
            "output.checkpoint_every=0", "eval.every_steps=0", "logging.log_every=1", "logging.progress=false",
            f"output.dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "matekd_ds", "train", *args], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scalars = out / "logs" / "scalars.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if scalars.is_file() and "student/" in scalars.read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "continue with --resume" in stderr
    tag = (out / "checkpoints/student/LATEST").read_text()
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 1

    resumed = run_cli(["train", "--resume", *args[:4], "train.max_steps=" + str(stopped_at + 3), *args[5:]],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in resumed.stderr
    assert _metrics(out)["student"]["steps"] == stopped_at + 3
