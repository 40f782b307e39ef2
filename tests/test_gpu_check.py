"""benchmarks/gpu_check.sh, the one command for a lent GPU: its --dry-run plan (on CPU) names its
seven steps in order, within 9 minutes in all, and every script flag, test file, preset and run-config
override it uses exists and loads; without a CUDA device the real run stops with one line."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import torch
from helpers import REPO

from matekd_ds.cli import default_config_path
from matekd_ds.config import load_config

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["versions", "kernel_tests", "bench_kernels", "bench_train", "bench_train_b128", "bench_optimizer", "train"]


def plan(out) -> dict[str, tuple[int, list[str]]]:
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^\d+\. (\w+) \(limit (\d+)s\): (.*)$", line)
        if match:
            steps[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3).split(" && ")[0]))
    return steps


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu"
    steps = plan(out)
    assert list(steps) == STEPS and not out.exists()
    assert sum(limit for limit, _ in steps.values()) <= 9 * 60


def _flags(command: list[str]) -> list[str]:
    return [token for token in command if token.startswith("--")]


def test_every_script_flag_test_file_preset_and_override_of_the_plan_exists(tmp_path):
    steps = plan(tmp_path / "gpu")
    tests = [t for t in steps["kernel_tests"][1] if t.startswith("tests/")]
    assert tests and all((REPO / t).is_file() for t in tests)
    assert "TRITON_INTERPRET" in steps["kernel_tests"][1][:3]  # unset: the kernels run natively
    for name in ("bench_kernels", "bench_train", "bench_train_b128", "bench_optimizer"):
        command = steps[name][1]
        source = (REPO / command[1]).read_text()
        for flag in _flags(command):
            assert f'"{flag}"' in source, (name, flag)
    batch = {}
    for name in ("bench_train", "bench_train_b128", "bench_optimizer"):
        command = steps[name][1]
        preset = command[command.index("--preset") + 1]
        cfg = load_config(REPO / "benchmarks" / "presets" / f"{preset}.yaml", [t for t in command if "=" in t])
        assert cfg.train.dtype == "bf16", name
        batch[name] = cfg.train.micro_batch_size
    assert batch == {"bench_train": 32, "bench_train_b128": 128, "bench_optimizer": 32}
    train = steps["train"][1]
    assert train[1:4] == ["-m", "matekd_ds", "train"]
    overrides = [t.replace("$RUN_DIR", str(tmp_path / "run")) for t in train[4:]]
    cfg = load_config(default_config_path(), overrides)  # the offline demo: no task or models named
    assert cfg.train.dtype == "bf16" and cfg.deepspeed.teacher == "teacher-inference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the real run would start")
def test_without_a_gpu_the_run_stops_with_one_line(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "gpu")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "benchmarks/gpu_check.sh: error: no CUDA device here (try --dry-run)"
    assert not (tmp_path / "gpu").exists()


def test_device_env_refuses_an_unknown_action_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "device_env.sh"), "fetch", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "device_env.sh: unknown action 'fetch' (wheels, install)"]
