"""docs/results.json and the leading table of docs/results.md (issue 27) are derived from the
measurements kept in docs/transfer_sets, not typed: regenerate the JSON the way the docs say
(benchmarks/quality/test_table.py --stored docs/transfer_sets ...) and compare, then check every
cell of the leading table against the per-seed scores it summarises."""

import json
from pathlib import Path

import pytest
from helpers import load_benchmark_script

DOCS = Path(__file__).resolve().parents[1] / "docs"
TASKS = ["sst2", "subj", "trec", "mrpc", "rte", "stsb"]
METHODS = "ft-e10=ft,kd-e10=kd,kd-random,kd-frozen,matekd-e10-lw-bf16-g2=matekd,kd-equal-time"
ROW_TASK = {"SST-2": "sst2", "SUBJ": "subj", "TREC": "trec", "STS-B": "stsb", "MRPC": "mrpc", "RTE": "rte"}


@pytest.fixture(scope="module")
def test_table():
    return load_benchmark_script("quality/test_table.py")


@pytest.fixture(scope="module")
def stored(test_table):
    """task -> (best-checkpoint file, final-checkpoint file, test rows), read as the docs command does."""
    return test_table.measured(None, TASKS, 1000, "agreement_test.json", "agreement_test_final.json",
                               DOCS / "transfer_sets")


def leading_table_rows() -> dict[str, list[str]]:
    """task -> the six arm cells of the first table in docs/results.md."""
    lines = (DOCS / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task (test rows)"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[ROW_TASK[cells[0].split(" ")[0]]] = cells[2:]
    return rows


def test_results_json_holds_every_task_and_arm_at_three_seeds(test_table):
    raw = json.loads((DOCS / "results.json").read_text())
    for task in TASKS:
        assert sorted(raw[task]) == sorted(test_table.parse_methods(METHODS).values()), task
        for method, scores in raw[task].items():
            assert len(scores) == 3 and all(0 < s < 100 for s in scores), (task, method, scores)


def test_results_json_is_what_the_stored_measurements_give(test_table, stored):
    regenerated = test_table.results_json(stored, test_table.parse_methods(METHODS))
    kept = json.loads((DOCS / "results.json").read_text())
    assert {t: regenerated[t] for t in TASKS} == {t: kept[t] for t in TASKS}


def test_leading_table_cells_summarise_the_stored_measurements(test_table, stored):
    rows = leading_table_rows()
    assert sorted(rows) == sorted(TASKS)
    run_names = list(test_table.parse_methods(METHODS))
    for task, cells in rows.items():
        best, final, _ = stored[task]
        assert len(cells) == len(run_names), task
        for run_name, shown in zip(run_names, cells):
            # test_table.py's own cell, without its "(n=3)" and the docs' bold marks
            expected = " / ".join(test_table.cell(test_table.per_seed(agreement, run_name))
                                  for agreement in (best, final))
            assert shown.replace("**", "") == expected.replace(" (n=3)", ""), (task, run_name)
