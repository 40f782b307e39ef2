"""benchmarks/quality/generator_movement.py: how far a run's generator moved from its warm start."""

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
