"""benchmarks/bench_optimizer.py on the CPU (fp32): every config is built through the product's
engine factory, the named ones as DeepSpeed's own engines and `product` with the fast path; the
fast path and the eager AdamW make the same update as DeepSpeed's fp32 ZeRO-2 (drift ~0: the
comparison is like for like), and bad input is one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "bench_optimizer.py"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_configs_on_the_cpu_make_the_same_update(tmp_path):
    result = run("--preset", "cpu-tiny", "--configs", "zero2,zero1+fp32-grads,product,torch-amp", "--steps", "3",
                 "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(re.findall(r"^(step_ms_\w+): ([0-9.]+)$", result.stdout, re.M))
    assert set(lines) == {"step_ms_zero2", "step_ms_zero1_fp32_grads", "step_ms_product", "step_ms_torch_amp"}
    saved = json.loads(next(tmp_path.glob("optimizer_cpu-tiny_cpu_*.json")).read_text())
    figures = saved["figures"]
    assert list(figures) == ["zero2", "zero1+fp32-grads", "product", "torch-amp"]
    assert figures["zero2"]["drift"] == 0.0
    # DeepSpeed's own ZeRO-2 and the product's ZeRO-0 fast path are different wrappers
    assert figures["zero2"]["wrapper"] == "DeepSpeedZeroOptimizer" and figures["product"]["wrapper"] == "AdamW"
    for name in ("zero1+fp32-grads", "product", "torch-amp"):  # fp32: the same update, clipping and schedule
        assert figures[name]["drift"] < 1e-4, (name, figures[name]["drift"])
        assert figures[name]["losses"] == figures["zero2"]["losses"] or \
            max(abs(a - b) for a, b in zip(figures[name]["losses"], figures["zero2"]["losses"])) < 1e-5
    assert all(f["step_ms"] > 0 and f["backward_ms"] > 0 for f in figures.values())


def test_a_half_precision_preset_without_a_gpu_is_one_line():
    result = run("--preset", "gpu-base", "--no-save", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bench_optimizer: error: preset gpu-base runs in bf16")
