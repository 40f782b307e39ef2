"""`matekd experiment`: spec checks, the plan, a tiny real sweep that resumes, and the report."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from helpers import child_env, run_cli

from matekd_ds.config import config_from_dict, merge
from matekd_ds.data.tasks import load_task_data
from matekd_ds.errors import MatekdError
from matekd_ds.experiment import runner as sweep_runner
from matekd_ds.experiment import select
from matekd_ds.experiment.plan import plan
from matekd_ds.experiment.report import report_rows, results_table, write_report
from matekd_ds.experiment.spec import read_spec

TINY = {
    "tasks": {"synthetic": {"data": {"synthetic": {"train_size": 160, "dev_size": 48}, "max_length": 24}}},
    "methods": ["ft", "matekd-fast"],
    "seeds": [1, 2],
    "base": {
        "models": {"student_init_from_teacher_layers": [0, 3]},
        "train": {"max_steps": 4, "micro_batch_size": 16, "lr": 1e-3},
        "eval": {"every_steps": 2},
    },
    "method_overrides": {
        "matekd-fast": {"method": "matekd", "matekd": {"generator_steps": 1, "student_steps": 1, "generator_lr": 1e-3}},
    },
    "teacher": {"model": "builtin:tiny-teacher", "finetune": {"train": {"max_steps": 6, "lr": 5e-4}}},
    "generator": {"model": "builtin:tiny-generator",
                  "mlm_warmup": {"matekd": {"generator_mlm_warmup_steps": 3}}},
}


def _spec(tmp_path, **changes):
    spec = dict(TINY, output_dir=str(tmp_path / "sweep"), **changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"methodz": ["ft"]}, "unknown key 'methodz'"),
    ({"methods": ["ft", "distil"]}, "unknown method 'distil'"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"teacher": {}}, "'teacher' is required"),
    ({"generator": {}}, "needs generator.model"),
    ({"base": {"train": {"lrr": 1}}}, "unknown config key 'train.lrr'"),
    ({"teacher": {"model": "${MATEKD_TEST_UNSET_VARIABLE}"}}, "is not set"),
    ({"transfer_sizes": 1000}, "'transfer_sizes' must be a non-empty list"),
    ({"transfer_sizes": []}, "'transfer_sizes' must be a non-empty list"),
    ({"transfer_sizes": [500, "1k"]}, "'transfer_sizes' must hold integers"),
    ({"transfer_sizes": [500, 2.5]}, "'transfer_sizes' must hold integers"),
    ({"transfer_sizes": [0, 500]}, "'transfer_sizes' must hold positive sizes, got 0"),
    ({"transfer_sizes": [500, 1000, 500]}, "'transfer_sizes' lists 500 more than once"),
])
def test_bad_specs_are_refused_before_anything_runs(tmp_path, changes, fragment):
    path = _spec(tmp_path, **changes)
    with pytest.raises(MatekdError, match=None) as err:
        plan(read_spec(path))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_a_spec_extends_another_stating_only_what_changes(tmp_path):
    base = _spec(tmp_path)
    arm_dir = tmp_path / "arms"
    arm_dir.mkdir()
    arm = arm_dir / "arm.yaml"
    arm.write_text(yaml.safe_dump({
        "extends": "../spec.yaml",  # relative to the arm's folder, not the working directory
        "methods": ["ft", "matekd-lw"],  # lists replace
        "method_overrides": {"matekd-lw": {"method": "matekd", "matekd": {"loss_weights": [0.25, 0.25, 0.5]}}},
        "base": {"train": {"lr": 5e-4}},  # mappings merge key by key
        "report_dir": str(tmp_path / "arm-report"),
    }))
    spec = read_spec(arm)
    assert "extends" not in spec
    assert spec["methods"] == ["ft", "matekd-lw"]
    assert set(spec["method_overrides"]) == {"matekd-fast", "matekd-lw"}
    assert spec["base"]["train"] == {**TINY["base"]["train"], "lr": 5e-4}
    assert spec["teacher"] == TINY["teacher"] and spec["output_dir"] == read_spec(base)["output_dir"]
    lw = {r.name: r for r in plan(spec)}["matekd-lw-seed1"].config
    assert lw["matekd"]["loss_weights"] == [0.25, 0.25, 0.5] and lw["train"]["lr"] == 5e-4


def test_an_arm_drops_an_inherited_task_by_setting_it_null(tmp_path):
    two_tasks = {**TINY["tasks"], "other": {"data": {"synthetic": {"train_size": 96, "dev_size": 32}}}}
    _spec(tmp_path, tasks=two_tasks)
    arm = tmp_path / "arm.yaml"
    arm.write_text(yaml.safe_dump({"extends": "spec.yaml",
                                   "tasks": {"synthetic": None, "other": {"data": {"max_length": 16}}}}))
    spec = read_spec(arm)
    assert list(spec["tasks"]) == ["other"]
    assert spec["tasks"]["other"]["data"] == {"synthetic": {"train_size": 96, "dev_size": 32}, "max_length": 16}
    assert {r.task for r in plan(spec)} == {"other"}
    assert set(read_spec(tmp_path / "spec.yaml")["tasks"]) == {"synthetic", "other"}  # the parent keeps both


@pytest.mark.parametrize("extends, fragment", [
    ("missing.yaml", "'extends' names"),
    ("arm.yaml", "'extends' comes back to"),
    (["spec.yaml"], "'extends' must name a spec file"),
])
def test_bad_extends_is_refused(tmp_path, extends, fragment):
    _spec(tmp_path)
    arm = tmp_path / "arm.yaml"
    arm.write_text(yaml.safe_dump({"extends": extends, "seeds": [1]}))
    with pytest.raises(MatekdError) as err:
        read_spec(arm)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_plan_prepares_first_then_goes_seed_by_seed(tmp_path):
    runs = plan(read_spec(_spec(tmp_path)))
    assert [r.name for r in runs[:2]] == ["teacher", "generator"]
    students = runs[2:]
    assert [r.seed for r in students] == [1, 1, 2, 2]
    by_name = {r.name: r for r in runs}
    teacher_dir = str(tmp_path / "sweep" / "synthetic" / "teacher" / "student_best")
    warm = str(tmp_path / "sweep" / "synthetic" / "generator" / "generator_warm")
    # the teacher run fine-tunes the teacher model itself (as a plain ft "student")
    assert by_name["teacher"].config["method"] == "ft"
    assert by_name["teacher"].config["models"]["student"] == "builtin:tiny-teacher"
    assert by_name["teacher"].config["models"]["student_init_from_teacher_layers"] is None
    # students load it, and the MATE-KD ones the shared warmed generator, without warming again
    fast = by_name["matekd-fast-seed2"].config
    assert fast["method"] == "matekd" and fast["matekd"]["generator_lr"] == 1e-3 and fast["train"]["seed"] == 2
    assert fast["models"]["teacher"] == teacher_dir and fast["models"]["generator"] == warm
    assert fast["matekd"]["generator_mlm_warmup_steps"] == 0
    assert by_name["ft-seed1"].needs == ["teacher"] and by_name["matekd-fast-seed1"].needs == ["teacher", "generator"]


def test_only_selects_matching_runs_with_the_preparation_they_need(tmp_path):
    runs = plan(read_spec(_spec(tmp_path)))
    assert select(runs, None) == runs
    # an FT student needs the teacher only; a MATE-KD one the teacher and the generator
    assert [r.name for r in select(runs, "ft-seed2$")] == ["teacher", "ft-seed2"]
    assert [r.name for r in select(runs, "matekd-fast-seed1")] == ["teacher", "generator", "matekd-fast-seed1"]
    assert [r.name for r in select(runs, "synthetic/generator")] == ["teacher", "generator"]  # it warms on the teacher
    with pytest.raises(MatekdError, match="matches none of the spec's runs"):
        select(runs, "sst2/")
    with pytest.raises(MatekdError, match="is not a regular expression"):
        select(runs, "kd-seed[")


def test_only_on_the_command_line_lists_just_those_runs(tmp_path):
    result = run_cli(["experiment", str(_spec(tmp_path)), "--dry-run", "--only", "ft-seed1$"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["synthetic/teacher", "synthetic/ft-seed1"]
    bad = run_cli(["experiment", str(_spec(tmp_path)), "--dry-run", "--only", "nothing-like-this"], tmp_path)
    assert bad.returncode != 0 and "matches none" in bad.stderr and "Traceback" not in bad.stderr


# The teacher on the whole training set, the students on its first 32 or 64 examples.
TRANSFER = {
    "transfer_sizes": [64, 32],
    "base": merge(TINY["base"], {"data": {"max_train_examples": 100}}),
    "teacher": merge(TINY["teacher"], {"finetune": {"data": {"max_train_examples": None}}}),
}


def test_a_null_limit_in_an_override_clears_the_base_limit():
    limited = {"data": {"synthetic": {"train_size": 50, "dev_size": 8}, "max_train_examples": 20}}
    cleared = config_from_dict(merge(limited, {"data": {"max_train_examples": None}}))
    assert cleared.data.max_train_examples is None
    whole = load_task_data(cleared).train
    first = load_task_data(config_from_dict(limited)).train
    assert len(whole) == 50 and first == whole[:20]  # the first N: a smaller set inside a larger one


def test_plan_with_transfer_sizes_prepares_once_then_students_per_size(tmp_path):
    runs = plan(read_spec(_spec(tmp_path, **TRANSFER)))
    task_dir = tmp_path / "sweep" / "synthetic"
    assert [r.label for r in runs] == [
        "synthetic/teacher", "synthetic/generator",
        "synthetic/n32/ft-seed1", "synthetic/n32/matekd-fast-seed1",
        "synthetic/n64/ft-seed1", "synthetic/n64/matekd-fast-seed1",
        "synthetic/n32/ft-seed2", "synthetic/n32/matekd-fast-seed2",
        "synthetic/n64/ft-seed2", "synthetic/n64/matekd-fast-seed2",
    ]
    by_label = {r.label: r for r in runs}
    teacher, generator = by_label["synthetic/teacher"], by_label["synthetic/generator"]
    assert teacher.run_dir == task_dir / "teacher" and generator.run_dir == task_dir / "generator"
    # teacher and generator warm-up see the whole training set, not base's limit of 100
    assert teacher.config["data"]["max_train_examples"] is None
    assert generator.config["data"]["max_train_examples"] is None
    assert config_from_dict(teacher.config).data.max_train_examples is None
    for run in runs[2:]:
        assert run.run_dir == task_dir / f"n{run.size}" / run.name
        assert run.config["data"]["max_train_examples"] == run.size
        assert run.config["task"] == "synthetic" and run.report_task == f"synthetic@{run.size}"
        assert run.config["models"]["teacher"] == str(task_dir / "teacher" / "student_best")
        assert run.config["output"]["dir"] == str(run.run_dir)
    assert by_label["synthetic/n64/matekd-fast-seed2"].config["models"]["generator"] \
        == str(task_dir / "generator" / "generator_warm")
    assert by_label["synthetic/n32/ft-seed1"].needs == ["teacher"]
    assert by_label["synthetic/n64/matekd-fast-seed1"].needs == ["teacher", "generator"]
    assert report_rows(runs) == {"synthetic": ["synthetic@32", "synthetic@64"]}


def test_a_task_key_names_the_directory_and_its_overrides_the_config_task(tmp_path):
    tasks = {"mine": {"task": "custom", "data": {"train_file": "train.tsv", "dev_file": "dev.tsv",
                                                 "text_columns": ["sentence"], "label_names": ["a", "b"]}}}
    runs = plan(read_spec(_spec(tmp_path, tasks=tasks, methods=["ft"], seeds=[1])))
    assert [r.label for r in runs] == ["mine/teacher", "mine/ft-seed1"]
    assert all(r.config["task"] == "custom" for r in runs)
    assert runs[1].run_dir == tmp_path / "sweep" / "mine" / "ft-seed1"


def _fake_metrics(run, best, train_seconds=60.0):
    """A finished run's metrics.json, as far as the report reads it."""
    metrics = {"status": "completed", "wall_seconds": 100.0}
    if run.kind == "generator":
        metrics["generator_warmup"] = {"steps": 3}
    if run.kind == "student":
        dev = {"dev": {"main": best / 100}}
        metrics.update(metric="accuracy", teacher={"dev": dev}, best={"dev": dev}, final=dev,
                       evaluations=[{"step": 4, "dev": dev}], throughput={"train_seconds": train_seconds})
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_the_report_has_a_row_per_task_and_transfer_size(tmp_path):
    spec = read_spec(_spec(tmp_path, **TRANSFER, report_dir=str(tmp_path / "report")))
    runs = plan(spec)
    for run in runs:
        _fake_metrics(run, best=50.0 + (run.size or 0) / 2 + (run.seed or 0), train_seconds=float(run.size or 0))
    out = write_report(spec, runs)
    raw = json.loads((out / "results.json").read_text())
    assert list(raw) == ["synthetic@32", "synthetic@64"]
    assert raw["synthetic@32"] == {"ft": pytest.approx([67.0, 68.0]), "matekd-fast": pytest.approx([67.0, 68.0])}
    assert raw["synthetic@64"]["ft"] == pytest.approx([83.0, 84.0])
    details = json.loads((out / "details.json").read_text())
    for row in ("synthetic@32", "synthetic@64"):
        assert details[row]["generator_warmup"] == {"steps": 3}
        assert details[row]["wall_seconds"] == 600.0  # its 4 students, and the shared teacher and generator
    table = (out / "results.md").read_text()
    assert "| method | synthetic@32 (accuracy) | synthetic@64 (accuracy) | average |" in table
    assert "| ft | 67.50 ± 0.71 (n=2) | 83.50 ± 0.71 (n=2) | 75.50 |" in table
    assert "| teacher |" in table
    assert "| ft | 0m32s | 1m04s |" in table  # mean training time per run
    assert "Wall-clock time of the finished runs: 16m40s." in table  # 10 runs, teacher counted once


def test_a_tiny_sweep_runs_resumes_and_reports(tmp_path):
    path = _spec(tmp_path)
    result = run_cli(["experiment", str(path)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "sweep"
    assert "[6/6] synthetic/matekd-fast-seed2" in result.stdout
    raw = json.loads((out / "results.json").read_text())
    assert set(raw) == {"synthetic"} and set(raw["synthetic"]) == {"ft", "matekd-fast"}
    for method, values in raw["synthetic"].items():
        scores = []
        for seed in (1, 2):
            metrics = json.loads((out / "synthetic" / f"{method}-seed{seed}" / "metrics.json").read_text())
            scores.append(100 * metrics["best"]["dev"]["dev"]["main"])
        assert values == pytest.approx(scores)
    table = (out / "results.md").read_text()
    assert "| matekd-fast |" in table and "(n=2)" in table and "| teacher |" in table
    details = json.loads((out / "details.json").read_text())
    assert details["synthetic"]["generator_warmup"]["steps"] == 3
    losses = details["synthetic"]["methods"]["matekd-fast"]["losses"][0]
    assert {"student/div_clean", "student/div_perturbed", "generator/gen_div"} <= set(losses)

    # rerunning resumes: nothing finished is redone
    again = run_cli(["experiment", str(path)], cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 already finished, 0 to go" in again.stdout


def test_failed_prerequisite_skips_its_dependents_and_exits_nonzero(tmp_path):
    path = _spec(tmp_path, methods=["ft"], seeds=[1],
                 teacher={"model": "builtin:tiny-teacher",
                          "finetune": {"deepspeed": {"student": str(tmp_path / "no.json")}}})
    result = run_cli(["experiment", str(path)], cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "synthetic/teacher (exit 2: matekd: error: DeepSpeed config not found" in result.stderr
    assert "synthetic/ft-seed1 (skipped: teacher failed)" in result.stderr


def test_report_statistics():
    tasks = {"t": {"metric": "accuracy", "teacher": 90.0, "methods": {
        "ft": {"best": [80.0, 82.0, 84.0]}, "kd": {"best": [85.0]}}, "wall_seconds": 1.0}}
    table = results_table(tasks, ["ft", "kd", "matekd"])
    assert "| ft | 82.00 ± 2.00 (n=3) | 82.00 |" in table
    assert "| kd | 85.00 ± 0.00 (n=1) | 85.00 |" in table
    assert "| matekd | – | – |" in table


def test_a_tiny_transfer_set_sweep_runs_and_reports_per_size(tmp_path):
    path = _spec(tmp_path, **TRANSFER, seeds=[1])
    result = run_cli(["experiment", str(path)], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "sweep"
    assert "[6/6] synthetic/n64/matekd-fast-seed1" in result.stdout

    def train_examples(run_dir):
        return (run_dir / "logs" / "train.log").read_text().split(" train examples")[0].rsplit(" ", 1)[-1]

    task_dir = out / "synthetic"
    assert train_examples(task_dir / "teacher") == "160"  # the whole set, not base's 100
    assert train_examples(task_dir / "generator") == "160"
    assert train_examples(task_dir / "n32" / "ft-seed1") == "32"
    assert train_examples(task_dir / "n64" / "matekd-fast-seed1") == "64"
    raw = json.loads((out / "results.json").read_text())
    assert list(raw) == ["synthetic@32", "synthetic@64"]
    details = json.loads((out / "details.json").read_text())
    assert details["synthetic@32"]["teacher"] == details["synthetic@64"]["teacher"] is not None
    metrics = json.loads((task_dir / "n64" / "ft-seed1" / "metrics.json").read_text())
    assert raw["synthetic@64"]["ft"] == pytest.approx([100 * metrics["best"]["dev"]["dev"]["main"]])
    assert "| matekd-fast |" in (out / "results.md").read_text()


@pytest.mark.parametrize("how", ["runner-only", "process-group"])
def test_a_stop_signal_stops_the_running_job_cleanly_and_the_sweep_resumes(tmp_path, how):
    """`kill RUNNER` (SIGTERM to the runner alone) reaches the job through the runner; Ctrl-C
    (SIGINT to the whole process group) reaches it twice, which it takes as one stop. Either way the
    job checkpoints and records "interrupted", nothing is left running, and rerunning resumes."""
    long = {**TINY["base"], "train": {**TINY["base"]["train"], "max_steps": 100000}, "eval": {"every_steps": 10000}}
    path = _spec(tmp_path, methods=["ft"], seeds=[1], base=long)
    runner = subprocess.Popen([sys.executable, "-m", "matekd_ds", "experiment", str(path)], cwd=tmp_path,
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    student_log = tmp_path / "sweep" / "synthetic" / "logs" / "ft-seed1.log"
    deadline = time.time() + 300
    while "] ft for " not in (student_log.read_text() if student_log.is_file() else ""):  # training started
        assert runner.poll() is None and time.time() < deadline, runner.communicate()
        time.sleep(0.5)
    job = psutil.Process(runner.pid).children()
    assert len(job) == 1
    sig = signal.SIGTERM if how == "runner-only" else signal.SIGINT
    if how == "runner-only":
        os.kill(runner.pid, sig)
    else:
        os.killpg(runner.pid, sig)
    out, err = runner.communicate(timeout=300)
    assert runner.returncode == 128 + sig, out[-2000:] + err[-2000:]
    assert "stopped during synthetic/ft-seed1; rerun the same command to resume" in err
    assert not job[0].is_running() or job[0].status() == psutil.STATUS_ZOMBIE
    metrics = json.loads((tmp_path / "sweep" / "synthetic" / "ft-seed1" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", metrics
    assert "Traceback" not in student_log.read_text()
    planned = {r.name: r for r in plan(read_spec(path))}
    assert planned["teacher"].completed() and not planned["ft-seed1"].completed()
    assert "--resume" in sweep_runner._command(planned["ft-seed1"], path, None)  # a rerun continues it
