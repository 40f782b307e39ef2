"""Non-finite training is detected: losses and device-side gradient norms at checks (no host
sync per step), DeepSpeed's skipped steps at once (fp16: after too many in a row), parameters
before checkpoints and exports."""

from __future__ import annotations

import pytest
import torch

from matekd_ds.errors import MatekdError
from matekd_ds.health import Diverged, TrainingHealth, finite_parameters
from matekd_ds.run_dir import RunDir


class FakeEngine:
    def __init__(self, norm=None):
        self.skipped_steps, self.norm = 0, norm
        self.module = torch.nn.Linear(2, 2)

    def get_global_grad_norm(self):
        return self.norm


def test_a_non_finite_loss_is_reported_with_its_first_step_at_the_check():
    health = TrainingHealth(allow_overflow_skips=False, max_overflow_skips=5)
    engines = {"student": FakeEngine()}
    for step, loss in enumerate([0.5, 0.4, float("nan"), float("inf"), 0.3], start=1):
        health.after_step(step, "student", {"loss": torch.tensor(loss), "ce": torch.tensor(0.1)}, engines)
    with pytest.raises(Diverged, match="at step 3: the student loss is not finite"):
        health.check()


def test_finite_losses_pass_and_device_norms_are_tracked():
    health = TrainingHealth(allow_overflow_skips=False, max_overflow_skips=5)
    engine = FakeEngine(norm=torch.tensor(1.0))
    for step in range(1, 4):
        health.after_step(step, "generator", {"gen_div": torch.tensor(0.2)}, {"generator": engine})
    health.check()
    engine.norm = torch.tensor(float("nan"))
    health.after_step(4, "generator", {"gen_div": torch.tensor(0.2)}, {"generator": engine})
    with pytest.raises(Diverged, match="at step 4: the generator gradient norm"):
        health.check()


def test_a_skipped_step_without_loss_scaling_is_divergence():
    health = TrainingHealth(allow_overflow_skips=False, max_overflow_skips=5)
    engine = FakeEngine()
    health.after_step(1, "student", {}, {"student": engine})
    engine.skipped_steps = 1
    with pytest.raises(Diverged, match="at step 2: the student gradient"):
        health.after_step(2, "student", {}, {"student": engine})


def test_fp16_overflow_skips_are_normal_up_to_the_limit():
    health = TrainingHealth(allow_overflow_skips=True, max_overflow_skips=3)
    engine = FakeEngine()
    health.after_step(1, "student", {}, {"student": engine})
    for step in range(2, 5):  # three skips in a row: the loss scaler's job
        engine.skipped_steps += 1
        health.after_step(step, "student", {}, {"student": engine})
    health.after_step(5, "student", {}, {"student": engine})  # a good step resets the count
    for step in range(6, 9):
        engine.skipped_steps += 1
        health.after_step(step, "student", {}, {"student": engine})
    engine.skipped_steps += 1
    with pytest.raises(Diverged, match="4 fp16 overflow skips in a row"):
        health.after_step(9, "student", {}, {"student": engine})


def test_parameters_are_checked_before_saving():
    health = TrainingHealth(allow_overflow_skips=False, max_overflow_skips=5)
    engine = FakeEngine()
    health.check_parameters(7, {"student": engine})
    assert finite_parameters(engine.module) is None
    with torch.no_grad():
        engine.module.bias[1] = float("inf")
    assert finite_parameters(engine.module) == "bias"
    with pytest.raises(Diverged, match="at step 7: the student parameter bias is not finite"):
        health.check_parameters(7, {"student": engine})


def test_a_nearly_full_filesystem_is_refused_before_the_run(tmp_path):
    with pytest.raises(MatekdError, match="MiB free, the run needs about"):
        RunDir(tmp_path / "run").check_space(1 << 60)
    RunDir(tmp_path / "run").check_space(1)
    assert not (tmp_path / "run").exists()
