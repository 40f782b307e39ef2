"""Ahead-of-time builds of every production kernel variant for sm_80 and sm_90, on CPU: no compile
error, no register spill, no variant that depends on the row count's alignment, SASS loops that
match each kernel's passes, vector loads for padded rows, and the H100 issue/memory estimates the
kernels were tuned to (see matekd_ds.kernels.aot and benchmarks/bench_kernels.py --aot).

The builds run in a child process (`python -m matekd_ds.kernels.aot`, one grandchild per target):
its stand-in driver and non-interpreted kernels must not meet the interpreter the other kernel
tests use in this process. 1 to 2 minutes on 2 cores.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from matekd_ds.kernels import aot
from matekd_ds.kernels.dispatch import HAS_TRITON, TRITON_REQUIREMENT

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_KERNELS = set(aot.SPECS)
# The issue's targets for the H100 estimate at M = 1229, V = 50265, bf16, sm_90 (issue/memory).
RATIO_LIMITS = {"_sample_ids_kernel": 1.5, "_gumbel_fwd_kernel": 2.0, "_gumbel_bwd_kernel": 2.0,
                "_divergence_fwd_kernel": 1.5, "_divergence_bwd_kernel": 1.5,
                "_divergence_small_fwd_kernel": 1.5, "_divergence_small_bwd_kernel": 1.5}

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="ahead-of-time builds need triton")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "matekd_ds.kernels.aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    print(proc.stdout)
    return data


def _builds(result, target=None):
    return [b for t in result["targets"] if target in (None, t["target"]) for b in t["builds"]]


def _launch_builds(result, target, case_part):
    """(case name, build) for the launches of ``target`` whose case name contains case_part."""
    out = []
    for per_target in result["targets"]:
        if per_target["target"] != target:
            continue
        builds = {b["hash"]: b for b in per_target["builds"]}
        out += [(launch["case"], builds[launch["hash"]]) for launch in per_target["launches"]
                if case_part in launch["case"]]
    return out


def test_every_variant_compiles_for_sm80_and_sm90(result):
    assert {t["target"] for t in result["targets"]} == {"sm_80", "sm_90"}
    for per_target in result["targets"]:
        assert per_target["errors"] == [], per_target["errors"][0]
        assert {b["kernel"] for b in per_target["builds"]} == PRODUCTION_KERNELS
        cases = {launch["case"] for launch in per_target["launches"]}
        assert {c.name for c in aot.production_cases()} == cases  # every case launched something


def test_no_register_spills(result):
    spilling = [(b["target"], b["kernel"], b["constexprs"], b["dtypes"]) for b in _builds(result)
                if b["spill_stores"] is None or b["spill_stores"] or b["spill_loads"]]
    assert not spilling
    assert max(b["registers"] for b in _builds(result)) <= 255


def test_row_count_alignment_does_not_add_variants(result):
    for per_target in result["targets"]:
        by_case: dict[str, dict[str, set]] = {}
        for launch in per_target["launches"]:
            by_case.setdefault(launch["shape_free_case"], {}).setdefault(launch["case"], set()).add(launch["hash"])
        for shape_free, by_rows in by_case.items():
            assert len(by_rows) == len(aot.ROWS), shape_free  # built for M = 8 and M = 7
            assert len({frozenset(h) for h in by_rows.values()}) == 1, (per_target["target"], shape_free)


def test_sass_loops_match_kernel_passes(result):
    inspected = [b for b in _builds(result) if b["loops"] is not None]
    assert {b["kernel"] for b in inspected} == PRODUCTION_KERNELS
    for b in inspected:
        assert len(b["loops"]) == aot.SPECS[b["kernel"]].loops(b["constexprs"]), (b["target"], b["kernel"])
    assert aot.problems(result) == []


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_padded_rows_get_vector_loads(result, target):
    # bf16 rows of V = 50265 are 2-byte aligned: scalar 16-bit loads. Padded to 50272 columns, the
    # same kernels issue vector loads in their main loops: 128 bits (8 elements) a thread, 64 in the
    # straight-through kernels, whose 4 sub-tiles give each thread 4 contiguous columns apiece.
    row_kernels = PRODUCTION_KERNELS - {"_divergence_small_fwd_kernel", "_divergence_small_bwd_kernel"}
    unpadded = {b["kernel"]: b for case, b in _launch_builds(result, target, f"/V={aot.PADDED_VOCAB}/M=8")
                if case.split("/")[1] in ("bf16", "bf16+bf16") and not case.endswith("padded") and b["loops"]}
    padded = {b["kernel"]: b for case, b in _launch_builds(result, target, "/padded") if b["loops"]}
    assert set(padded) == set(unpadded) == row_kernels
    for kernel in row_kernels:
        expected = 64 if kernel.startswith("_gumbel") else 128
        assert max(loop["max_load_bits"] for loop in padded[kernel]["loops"]) == expected, kernel
        assert max(loop["max_load_bits"] for loop in unpadded[kernel]["loops"]) == 16, kernel


def test_h100_estimates_within_the_issue_limits(result):
    worst = {}
    for case, build in _launch_builds(result, "sm_90", "/bf16"):
        small = build["kernel"].startswith("_divergence_small")
        n_cols = int(case.split("/V=")[1].split("/")[0])
        if case.split("/")[1] not in ("bf16", "bf16+bf16") or "padded" in case:
            continue
        if n_cols not in ((2, 3) if small else (aot.ESTIMATE_COLS,)):
            continue
        ratio = aot.estimate(build, aot.ESTIMATE_ROWS, n_cols)["issue_over_memory"]
        worst[build["kernel"]] = max(ratio, worst.get(build["kernel"], 0.0))
    assert set(worst) == PRODUCTION_KERNELS
    over = {k: round(v, 2) for k, v in worst.items() if v > RATIO_LIMITS[k]}
    assert not over, over


def test_setup_pins_the_supported_triton_range():
    pins = re.findall(r'"(triton[<>=!~][^"]*)"', (REPO / "setup.py").read_text())
    assert len(pins) == 2 and set(pins) == {f"triton{TRITON_REQUIREMENT}"}, pins  # the triton and test extras


def test_sass_summary_finds_loops_and_load_widths():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0030*/                   STG.E desc[UR4][R6.64], R2 ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    summary = aot.sass_summary(sass)
    assert summary["instructions"] == 6
    assert summary["loops"] == [{"length": 4, "loads": 2, "stores": 1, "max_load_bits": 128}]
