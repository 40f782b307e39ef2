"""What a user sees on the command line (issue 24): stdout holds only what a script parses,
`| head` ends quietly, a mistyped option fails before anything heavy is imported, eval and
predict show progress on long inputs; the deployment numbers (size, CPU latency, speed-up,
accuracy kept) in metrics.json, the summary, the model cards and `matekd eval --latency`; and
`matekd export --onnx`, checked with onnxruntime.

One tiny KD run (its teacher fine-tuned, so it has a teacher/ export) is trained once and shared.
Speed numbers are checked for structure and consistency, never against thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TASK, child_env, matekd_in_process, run_cli
from test_cli import assert_one_line_error

TINY_TIMING = ["eval.latency_warmup=1", "eval.latency_iterations=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`matekd train` of a tiny KD run: (run directory, the finished process)."""
    root = tmp_path_factory.mktemp("deploy")
    out = root / "run"
    result = run_cli(["train", *TINY_TASK, "method=kd", "models.teacher=builtin:bert-L2-H32-A2",
                      "models.student=builtin:bert-L1-H32-A2", "models.teacher_finetune_epochs=1",
                      "train.max_steps=3", "logging.progress=false", *TINY_TIMING, f"output.dir={out}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def matekd(capfd, *args) -> tuple[int, str, str]:
    """`matekd ARGS` in this process: (exit code, stdout, stderr)."""
    return matekd_in_process(capfd, *args)


# ---------------------------------------------------------------------------------------------
# 4. Clean output


def test_train_stdout_holds_the_summary_alone_and_logs_go_to_stderr(trained):
    _, result = trained
    assert "WARNING" not in result.stdout and "[matekd]" not in result.stdout  # DeepSpeed's warning included
    assert "run directory:" in result.stdout and "CPU inference" in result.stdout
    assert "[matekd] [student]" in result.stderr


def test_an_argument_error_comes_before_any_heavy_import():
    probe = ("import sys\nfrom matekd_ds import cli\n"
             "try:\n    cli.main(['train', '--bogus'])\nexcept SystemExit as stop:\n    code = stop.code\n"
             "print(code, sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.stdout.split("\n")[0] == "2 []", result.stdout + result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr
    direct = run_cli(["export", "--bogus"], cwd=Path.cwd())  # `python -m matekd_ds`: the same path
    assert direct.returncode == 2 and "Traceback" not in direct.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly(trained):
    """`matekd eval RUN | head`: the pipe's reader is gone before the table is printed."""
    run, _ = trained
    process = subprocess.Popen([sys.executable, "-m", "matekd_ds", "eval", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=child_env(), cwd=run.parent, text=True)
    process.stdout.close()  # the reader leaves at once
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_eval_shows_progress_on_stderr_for_a_long_input_and_not_for_a_short_one(trained):
    run, _ = trained
    long = run_cli(["eval", str(run), "data.synthetic.dev_size=2500", "--json"], cwd=run.parent)
    assert long.returncode == 0, long.stderr[-2000:]
    assert "eval: 100%" in long.stderr and json.loads(long.stdout)["examples"]["dev"] == 2500  # stdout: JSON alone
    short = run_cli(["eval", str(run), "--json"], cwd=run.parent)
    assert short.returncode == 0 and "eval:" not in short.stderr  # a log file gets no bar for 50 rows


def test_on_a_terminal_every_scoring_loop_of_eval_and_predict_draws_a_bar(trained, tmp_path, capfd, monkeypatch):
    run, _ = trained
    from matekd_ds import evaluation

    monkeypatch.setattr(evaluation, "_stderr_is_terminal", lambda: True)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": f"the film is good {i}"}) + "\n" for i in range(40)))
    code, out, err = matekd(capfd, "predict", run, "--data", rows, "--out", tmp_path / "p.tsv")
    assert code == 0, err
    assert "predict:" in err and "predict:" not in out and out.startswith("wrote 40 predictions")


# ---------------------------------------------------------------------------------------------
# 5. The deployment numbers


def test_metrics_json_records_size_latency_speedup_and_accuracy_kept(trained):
    run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    d = metrics["deployment"]
    assert d["student_params"] == metrics["student"]["params"] and d["teacher_params"] == metrics["teacher"]["params"]
    assert d["params_ratio"] == pytest.approx(d["teacher_params"] / d["student_params"], rel=1e-3)
    assert d["student_bytes"] == (run / "student" / "model.safetensors").stat().st_size
    assert d["teacher_bytes"] == (run / "teacher" / "model.safetensors").stat().st_size
    assert d["teacher"] == str(run / "teacher")
    for latency, speed in ((d["latency_ms"], d["throughput_per_s"]),
                           (d["teacher_latency_ms"], d["teacher_throughput_per_s"])):
        assert set(latency) == {"batch_1", "batch_32"}
        for batch, entry in latency.items():
            assert 0 < entry["p50"] <= entry["p90"] and 1 <= entry["n"] <= 3
            assert speed[batch] == pytest.approx(int(batch.split("_")[1]) / (entry["p50"] / 1e3), rel=1e-3)
    ratio = d["teacher_latency_ms"]["batch_32"]["p50"] / d["latency_ms"]["batch_32"]["p50"]
    assert d["speedup_vs_teacher"] == pytest.approx(ratio, rel=1e-3)
    kept = metrics["final"]["dev"]["main"] / metrics["teacher"]["dev"]["dev"]["main"]
    assert d["accuracy_kept"] == pytest.approx(kept, abs=1e-4)
    s = d["settings"]
    assert s["device"] == "cpu" and s["dtype"] == "fp32" and s["max_length"] == 32 and s["threads"] >= 1
    assert s["cpu"] and (s["warmup"], s["iterations"]) == (1, 3)


def test_the_summary_and_both_model_cards_carry_the_numbers(trained):
    run, result = trained
    d = json.loads((run / "metrics.json").read_text())["deployment"]
    assert f"{d['speedup_vs_teacher']:.2f}x the teacher's speed at batch 32" in result.stdout
    for export in ("student", "student_best", "teacher"):
        card = (run / export / "README.md").read_text()
        assert "## Deployment" in card and f"{d['speedup_vs_teacher']:.2f}x" in card, export
    teacher = (run / "teacher" / "README.md").read_text()
    assert "# run-teacher" in teacher and "Dev set, after fine-tuning." in teacher
    assert "| parameters | " in teacher and "| learning rate | " in teacher


def test_eval_latency_measures_again_and_json_stays_pure(trained, capfd):
    run, _ = trained
    code, out, err = matekd(capfd, "eval", run, *TINY_TIMING, "--latency", "--json")
    assert code == 0, err
    d = json.loads(out)["deployment"]
    assert {"student_params", "teacher_params", "latency_ms", "speedup_vs_teacher", "accuracy_kept"} <= set(d)
    assert d["teacher"] == str(run / "teacher") and d["speedup_vs_teacher"] > 0
    code, out, _ = matekd(capfd, "eval", run / "student", *TINY_TIMING, "--latency")
    assert code == 0 and "CPU inference" in out and "student:" in out


def test_a_run_without_a_teacher_records_the_student_alone(tmp_path):
    out = tmp_path / "ft"
    result = run_cli(["train", *TINY_TASK, "method=ft", "models.student=builtin:bert-L1-H32-A2", "train.max_steps=2",
                      "logging.progress=false", "eval.deployment_latency=false", f"output.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    d = json.loads((out / "metrics.json").read_text())["deployment"]
    assert d["student_params"] > 0 and d["student_bytes"] > 0
    assert d["teacher_params"] is None and d["accuracy_kept"] is None and "latency_ms" not in d
    assert "not timed" in result.stdout and "no teacher to compare with" in result.stdout


def test_a_teacher_partitioned_over_the_ranks_is_not_loaded_whole_to_be_timed(trained, monkeypatch):
    """deepspeed.teacher=teacher-inference: a teacher larger than one rank's memory. The run records
    its sizes and times the student only (the RSS-budget test of test_zero3_loading.py relies on it)."""
    from matekd_ds import deployment
    from matekd_ds.config import config_from_dict, merge, read_config_file
    from matekd_ds.models import load_tokenizer

    run, _ = trained
    partitioned = {"deepspeed": {"teacher": "teacher-inference"}}
    cfg = config_from_dict(merge(read_config_file(run / "config.yaml"), partitioned), for_training=False)
    loaded = []
    real = deployment.load_for_timing
    monkeypatch.setattr(deployment, "load_for_timing", lambda role, *a: loaded.append(role) or real(role, *a))
    metrics = json.loads((run / "metrics.json").read_text())
    d = deployment.for_run(run, cfg, load_tokenizer(str(run / "tokenizer")), metrics)
    assert loaded == ["student"]
    assert d["teacher_params"] == metrics["teacher"]["params"] and d["teacher_bytes"] > 0
    assert d["teacher_latency_ms"] is None and d["speedup_vs_teacher"] is None and "teacher_not_timed" in d
    assert d["latency_ms"]["batch_32"]["p50"] > 0


def test_timing_is_bounded_for_a_large_model():
    from torch import nn

    from matekd_ds import deployment

    class Counting(nn.Module):
        calls = 0

        def forward(self, **inputs):
            Counting.calls += 1

    times = deployment.forward_seconds(Counting(), {}, warmup=5, iterations=50, budget_s=0.0)
    assert len(times) == deployment.MIN_TIMED and Counting.calls == 1 + deployment.MIN_TIMED
    assert times == sorted(times)
    assert deployment.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and deployment.percentile([1.0, 2.0], 0.9) == 2.0


# ---------------------------------------------------------------------------------------------
# 6. ONNX export


def test_export_onnx_matches_pytorch_on_the_dev_set(trained):
    import onnxruntime
    import torch
    from transformers import AutoModelForSequenceClassification

    from matekd_ds.config import config_from_dict, read_config_file
    from matekd_ds.data.batching import collate, encode
    from matekd_ds.data.tasks import load_dev_sets
    from matekd_ds.models import load_tokenizer

    run, _ = trained
    result = run_cli(["export", str(run), "--onnx"], cwd=run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |logits - PyTorch's|" in result.stdout and "Traceback" not in result.stderr
    folder = run / "onnx"
    record = json.loads((folder / "export.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["checked_examples"] == {"dev": 50}

    # checked again here, independently of the command: onnxruntime against PyTorch, every dev row
    cfg = config_from_dict(read_config_file(run / "config.yaml"), for_training=False)
    tokenizer = load_tokenizer(str(folder))
    data = encode(load_dev_sets(cfg)["dev"], tokenizer, cfg.data.max_length, regression=False)
    model = AutoModelForSequenceClassification.from_pretrained(run / "student").eval()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for start in range(0, len(data), 16):
        batch = collate(data, list(range(start, min(start + 16, len(data)))), tokenizer.pad_token_id)
        batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
        with torch.no_grad():
            expected = model(**{k: batch[k] for k in names}).logits.numpy()
        got = session.run(["logits"], {k: batch[k].numpy() for k in names})[0]
        assert np.abs(got - expected).max() <= 1e-4
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_export_errors_are_one_line_and_write_nothing(trained, tmp_path, capfd):
    run, _ = trained
    assert_one_line_error(run_cli(["export", str(run)], cwd=tmp_path), "name a format: --onnx")
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = matekd(capfd, "export", run, "--onnx", "--out", tmp_path)
    assert code == 2 and err.strip().startswith("matekd: error: --out") and "not an ONNX export" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
