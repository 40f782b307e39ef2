"""benchmarks/bench_matekd_cost.py: the price of each cheaper MATE-KD variant against KD, on the
shipped step (run factory), printed as `<variant> ... matekd_over_kd_time: X`."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, child_env

SCRIPT = REPO / "benchmarks" / "bench_matekd_cost.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu-tiny", *args], capture_output=True,
                          text=True, timeout=600, env=child_env())


def test_each_variant_gets_its_time_ratio_against_kd():
    result = _bench("--variants", "base,all-rows,bf16", "--rounds", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = dict(re.findall(r"^(\S+)\s+generator step .* matekd_over_kd_time: ([0-9.]+)$", result.stdout, re.M))
    assert set(ratios) == {"base", "all-rows", "bf16"}
    assert all(float(r) > 0 for r in ratios.values())
    assert "10 student steps + 1 generator step(s) per cycle" in result.stdout


def test_a_variant_the_models_cannot_take_is_one_line():
    result = _bench("--variants", "g2", "--rounds", "1")  # cpu-tiny's generator has one layer
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "bench_matekd_cost.py: error: matekd.generator_layers is 2 but the generator has 1 encoder layers")
    unknown = _bench("--variants", "nope")
    assert unknown.returncode == 2 and "unknown variant nope" in unknown.stderr
