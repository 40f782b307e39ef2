"""Every experiment spec under benchmarks/quality plans: its keys, method variants and run
configs validate (what `matekd experiment SPEC --dry-run` checks) before hours of CPU are spent
on it. The specs name the MiniLM teacher by ${MINILM}; a placeholder path is enough to plan."""

from __future__ import annotations

import pytest
from helpers import REPO

from matekd_ds.experiment.plan import plan
from matekd_ds.experiment.spec import read_spec

SPECS = sorted((REPO / "benchmarks" / "quality").glob("*.yaml"))


def test_there_are_specs_to_check():
    assert len(SPECS) >= 10


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_quality_spec_plans(path, monkeypatch):
    monkeypatch.setenv("MINILM", "/placeholder/all-MiniLM-L6-v2")
    monkeypatch.chdir(REPO)
    spec = read_spec(path)
    runs = plan(spec)
    students = [run for run in runs if run.method is not None and run.name not in ("teacher", "generator")]
    assert students, path.name
    for name in spec["methods"]:  # every method or variant the spec names has runs, one per seed
        assert any(run.name.startswith(f"{name}-seed") for run in students), (path.name, name)
