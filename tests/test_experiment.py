"""`matekd experiment`: spec checks, the plan, a tiny real sweep that resumes, and the report."""

import json

import pytest
import yaml
from helpers import run_cli

from matekd_ds import experiment
from matekd_ds.errors import MatekdError

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
])
def test_bad_specs_are_refused_before_anything_runs(tmp_path, changes, fragment):
    path = _spec(tmp_path, **changes)
    with pytest.raises(MatekdError, match=None) as err:
        experiment.plan(experiment.read_spec(path))
    assert fragment in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_plan_prepares_first_then_goes_seed_by_seed(tmp_path):
    runs = experiment.plan(experiment.read_spec(_spec(tmp_path)))
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
                 teacher={"model": "builtin:tiny-teacher", "finetune": {"deepspeed": {"student": str(tmp_path / "no.json")}}})
    result = run_cli(["experiment", str(path)], cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "synthetic/teacher (exit 2: matekd: error: DeepSpeed config not found" in result.stderr
    assert "synthetic/ft-seed1 (skipped: teacher failed)" in result.stderr


def test_report_statistics():
    tasks = {"t": {"metric": "accuracy", "teacher": 90.0, "methods": {
        "ft": {"best": [80.0, 82.0, 84.0]}, "kd": {"best": [85.0]}}, "wall_seconds": 1.0}}
    table = experiment.results_table(tasks, ["ft", "kd", "matekd"])
    assert "| ft | 82.00 ± 2.00 (n=3) | 82.00 |" in table
    assert "| kd | 85.00 ± 0.00 (n=1) | 85.00 |" in table
    assert "| matekd | – | – |" in table
