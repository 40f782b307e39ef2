"""method kd-aug: knowledge distillation with masked-LM augmentation, the cheaper arm issue 27
found to give MATE-KD's gain (docs/results.md). It is MATE-KD's student step with the warmed
generator frozen, built without a generator engine: the student it trains is the one
`matekd.generator_steps: 0` trains, bit for bit, with no generator optimizer, gradients or
checkpoints. Tiny runs through `matekd train`'s own factory (pipeline.run_training). What kd-aug
refuses is in test_perturbation_arms.py, beside the other arms' one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml
from test_perturbation_arms import SeenEngines, kept_signal_handlers, run_config, scalar_names
from test_recovery import assert_same_run

from matekd_ds import pipeline
from matekd_ds.errors import MatekdError
from matekd_ds.experiment.plan import plan
from matekd_ds.experiment.spec import read_spec
from matekd_ds.faults import FaultInjection
from matekd_ds.summary import summary_rows

# a generator warm-up, so that the generator kd-aug freezes is the warmed one a run made
KD_AUG = ("method=kd-aug", "train.max_steps=6", "matekd.generator_mlm_warmup_steps=3", "matekd.generator_steps=4")


@pytest.fixture(autouse=True)
def own_signal_handlers():
    with kept_signal_handlers():
        yield


@pytest.fixture(scope="module")
def kd_aug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kd-aug") / "run"
    seen = SeenEngines()
    with kept_signal_handlers():
        metrics = pipeline.run_training(run_config(out, *KD_AUG), callbacks=[seen])
    return out, metrics, seen


def test_kd_aug_trains_the_student_alone_with_the_frozen_generator(kd_aug_run):
    out, metrics, seen = kd_aug_run
    assert metrics["status"] == "completed" and metrics["method"] == "kd-aug"
    assert metrics["perturbation"] == "generator" and metrics["generator_warmup"]["steps"] == 3
    assert set(seen.engines) == {"student"} and seen.trained == ["student"] * 6
    assert set(metrics["memory"]) == {"teacher", "student"}  # no generator engine: nothing of it to hold
    assert not (out / "checkpoints/student/generator").exists()
    assert (yaml.safe_load((out / "config.yaml").read_text())["matekd"]["generator_steps"]) == 0
    names = scalar_names(out)
    assert "student/div_perturbed" in names and not any(n.startswith("generator/") for n in names)


def test_kd_aug_is_the_frozen_generator_arm_bit_for_bit(kd_aug_run, tmp_path):
    out, _, _ = kd_aug_run
    frozen = tmp_path / "frozen"
    overrides = [o for o in KD_AUG if not o.startswith(("method=", "matekd.generator_steps="))]
    metrics = pipeline.run_training(run_config(frozen, *overrides, "matekd.generator_steps=0"))
    assert metrics["method"] == "matekd"
    assert_same_run(frozen, out)


def test_kd_aug_says_what_it_is_in_its_model_card_and_summary(kd_aug_run):
    out, metrics, _ = kd_aug_run
    card = (out / "student/README.md").read_text()
    assert "| method | `kd-aug` |" in card and "masked-LM augmentation" in card
    assert "a frozen generator, never trained" in card
    assert summary_rows(metrics)[-1][0] == "student (kd-aug)"


def test_kd_aug_resumes_bit_identically(kd_aug_run, tmp_path):
    reference, _, _ = kd_aug_run
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_training(run_config(out, *KD_AUG), callbacks=[FaultInjection(crash_after=(3, "student"))])
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"
    pipeline.run_training(run_config(out, *KD_AUG), resume=True)
    assert_same_run(reference, out)
    with pytest.raises(MatekdError, match="'method' differs from the run"):
        pipeline.run_training(run_config(out, *[o for o in KD_AUG if o != "method=kd-aug"]), resume=True)


def test_a_spec_plans_kd_aug_on_the_warmed_generator_and_not_by_default(tmp_path):
    spec = {"output_dir": str(tmp_path / "sweep"), "tasks": {"synthetic": {}}, "methods": ["kd", "kd-aug"],
            "seeds": [1], "teacher": {"model": "builtin:tiny-teacher"},
            "generator": {"model": "builtin:tiny-generator",
                          "mlm_warmup": {"matekd": {"generator_mlm_warmup_steps": 3}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = {run.name: run for run in plan(read_spec(path))}
    assert runs["kd-aug-seed1"].needs == ["teacher", "generator"]
    assert runs["kd-aug-seed1"].config["matekd"]["generator_mlm_warmup_steps"] == 0  # it takes the warmed one
    del spec["methods"]
    path.write_text(yaml.safe_dump(spec))
    assert {run.name for run in plan(read_spec(path))} >= {"ft-seed1", "kd-seed1", "matekd-seed1"}
    assert not any(run.name.startswith("kd-aug") for run in plan(read_spec(path)))
