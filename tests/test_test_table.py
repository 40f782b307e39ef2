"""benchmarks/quality/test_table.py: the test-split table (best / final checkpoint per arm), the
paired gaps with their spread, and docs/results.json's layout (task -> method -> per-seed list)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "test_table.py"
METHODS = "ft-e10=ft,kd-e10=kd,kd-frozen,matekd-e10=matekd"


@pytest.fixture(scope="module")
def test_table():
    return load_benchmark_script("quality/test_table.py")


def write_agreement(folder, name, accuracies, teacher=0.9):
    """student_agreement.py's JSON: run name -> acc (a fraction)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"examples": 200, "teacher": {"acc": teacher},
                                           "runs": {run: {"acc": acc} for run, acc in accuracies.items()}}))


def sweep(tmp_path):
    folder = tmp_path / "sst2" / "n1000"
    write_agreement(folder, "agreement_test.json", {
        "ft-e10-seed1": 0.70, "ft-e10-seed2": 0.72,
        "kd-e10-seed1": 0.73, "kd-e10-seed2": 0.75,
        "kd-frozen-seed2": 0.78, "kd-frozen-seed1": 0.74,      # file order is not seed order
        "matekd-e10-seed1": 0.75, "matekd-e10-seed2": 0.78, "matekd-e10-seed3": 0.80,
        "other-seed1": 0.5})                                   # a method the table does not name
    write_agreement(folder, "agreement_test_final.json", {"kd-e10-seed1": 0.71, "matekd-e10-seed1": 0.74})
    return tmp_path


def test_table_cells_are_best_slash_final_per_arm(tmp_path, test_table):
    found = test_table.measured(sweep(tmp_path), ["sst2", "subj"], 1000,
                                "agreement_test.json", "agreement_test_final.json")
    assert list(found) == ["sst2"]  # subj has no file
    elsewhere = test_table.measured(tmp_path / "none", [f"sst2={tmp_path}"], 1000,
                                    "agreement_test.json", "agreement_test_final.json")
    assert list(elsewhere) == ["sst2"]  # task=ROOT: another output_dir
    lines = test_table.table(found, test_table.parse_methods(METHODS)).splitlines()
    assert lines[0] == "| task (metric, test rows) | teacher | ft | kd | kd-frozen | matekd |"
    assert lines[2] == ("| sst2 (accuracy, 200) | 90.00 | 71.00 ± 1.41 (n=2) / – "
                        "| 74.00 ± 1.41 (n=2) / 71.00 ± 0.00 (n=1) | 76.00 ± 2.83 (n=2) / – "
                        "| 77.67 ± 2.52 (n=3) / 74.00 ± 0.00 (n=1) |")


def test_gaps_pair_seeds_and_give_their_spread(tmp_path, test_table):
    found = test_table.measured(sweep(tmp_path), ["sst2"], 1000, "agreement_test.json", "agreement_test_final.json")
    text = test_table.gaps(found, test_table.parse_methods(METHODS))
    # matekd seed 3 has no kd partner: the pairs are seeds 1 and 2 (+2.0, +3.0)
    assert "matekd − kd (best) +2.50 ± 0.71 (2 seeds)" in text
    assert "matekd − kd (final) +3.00 (1 seed)" in text
    assert "matekd − kd-frozen (best) +0.50 ± 0.71 (2 seeds)" in text
    assert "kd − ft (best) +3.00 ± 0.00 (2 seeds)" in text
    assert "kd-random" not in text  # not a column here
    assert "average over 1 tasks: matekd − kd-frozen (best) +0.50" in text


def test_a_task_is_scored_by_its_main_metric_when_the_file_has_one(tmp_path, test_table):
    folder = tmp_path / "stsb" / "n1000"
    folder.mkdir(parents=True)
    rows = {"kd-e10-seed1": {"score": 0.61, "pearson": 0.61, "spearman": 0.58},
            "matekd-e10-seed1": {"score": 0.64, "pearson": 0.64, "spearman": 0.60}}
    (folder / "agreement_test.json").write_text(json.dumps({"examples": 1500, "metric": "pearson",
                                                            "teacher": {"score": 0.8}, "runs": rows}))
    found = test_table.measured(tmp_path, ["stsb"], 1000, "agreement_test.json", "agreement_test_final.json")
    methods = test_table.parse_methods("kd-e10=kd,matekd-e10=matekd")
    assert test_table.table(found, methods).splitlines()[2] == (
        "| stsb (pearson, 1500) | 80.00 | 61.00 ± 0.00 (n=1) / – | 64.00 ± 0.00 (n=1) / – |")
    assert test_table.results_json(found, methods) == {"stsb": {"kd": [61.0], "matekd": [64.0]}}


def test_stored_copies_are_read_by_task_name(tmp_path, test_table):
    sweep(tmp_path / "runs")
    for name in ("agreement_test.json", "agreement_test_final.json"):
        (tmp_path / "runs" / "sst2" / "n1000" / name).rename(tmp_path / test_table.stored_name(name, "sst2"))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["agreement_test_final_sst2.json",
                                                               "agreement_test_sst2.json"]
    found = test_table.measured(None, ["sst2", "subj"], 1000, "agreement_test.json", "agreement_test_final.json",
                                stored=tmp_path)
    assert list(found) == ["sst2"] and found["sst2"][2] == 200
    done = subprocess.run([sys.executable, str(SCRIPT), "--stored", str(tmp_path), "--tasks", "sst2",
                           "--methods", METHODS], capture_output=True, text=True)
    assert done.returncode == 0 and "| sst2 (accuracy, 200) |" in done.stdout, done.stderr


def test_results_json_is_task_method_per_seed_list(tmp_path, test_table):
    found = test_table.measured(sweep(tmp_path), ["sst2"], 1000, "agreement_test.json", "agreement_test_final.json")
    raw = test_table.results_json(found, test_table.parse_methods(METHODS))
    assert raw == {"sst2": {"ft": [70.0, 72.0], "kd": [73.0, 75.0], "kd-frozen": [74.0, 78.0],
                            "matekd": [75.0, 78.0, 80.0]}}


def test_cli_writes_json_and_fails_in_one_line_without_files(tmp_path):
    runs = sweep(tmp_path / "runs")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(runs), "--tasks", "sst2", "--methods", METHODS,
                           "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| sst2 (accuracy, 200) |" in done.stdout
    assert json.loads(out.read_text())["sst2"]["kd"] == [73.0, 75.0]
    empty = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none"), "--tasks", "sst2",
                            "--methods", METHODS], capture_output=True, text=True)
    assert empty.returncode != 0
    assert empty.stderr.strip().startswith("error: no agreement_test.json") and "Traceback" not in empty.stderr
