"""benchmarks/quality/generator_movement.py: how far a run's generator moved from its warm start."""

import json

import pytest
import torch
from helpers import load_benchmark_script


@pytest.fixture(scope="module")
def movement():
    return load_benchmark_script("quality/generator_movement.py")


def test_weight_change_is_relative_over_all_tensors_and_per_tensor(movement):
    start = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2)}  # |w| = 5; b starts at zero
    trained = {"w": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 0.1])}
    total, largest = movement.weight_change(trained, start)
    assert total == pytest.approx(((0.5 ** 2 + 0.1 ** 2) / 25) ** 0.5)
    assert largest == pytest.approx(0.5 / 5)  # the zero-start bias has no relative change
    assert movement.weight_change(start, start) == (0.0, 0.0)


def test_the_newest_generator_checkpoint_is_read(movement, tmp_path):
    assert movement.last_generator_checkpoint(tmp_path) is None
    for step in ("step_00000040", "step_00000350"):
        folder = tmp_path / "checkpoints" / "student" / "generator" / step
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert movement.last_generator_checkpoint(tmp_path).parent.name == "step_00000350"


def test_the_probe_summary_reads_metrics_adversary(movement, tmp_path):
    assert movement.probe_summary(tmp_path) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"adversary": [
        {"step": 10, "div_trained": 0.5, "div_warm": 0.5, "weight_change": 1e-5, "weight_change_max": 1e-4},
        {"step": 120, "div_trained": 0.6, "div_warm": 0.4, "weight_change": 2e-5, "weight_change_max": 2e-4}]}))
    summary = movement.probe_summary(tmp_path)
    assert summary["probe_phases"] == 2
    assert (summary["div_trained_last"], summary["div_warm_last"]) == (0.6, 0.4)
    assert summary["div_gain_mean"] == pytest.approx(0.25)  # (0 + 0.5) / 2
    assert summary["div_gain_max"] == pytest.approx(0.5)
    (tmp_path / "metrics.json").write_text(json.dumps({"best": {}}))  # a run without the probe
    assert movement.probe_summary(tmp_path) is None
