"""benchmarks/quality/transfer_table.py: the headline table and the MATE-KD − KD / KD − FT gaps,
for the headline sweep and for a recipe arm that names its own methods."""

import json

import pytest
from helpers import load_benchmark_script


@pytest.fixture(scope="module")
def transfer_table():
    return load_benchmark_script("quality/transfer_table.py")


def write_sweep(out, methods):
    """details.json of two rows (the same numbers in each)."""
    details = {row: {"teacher": 90.0, "generator_warmup": {"dev_after": {"accuracy": 0.2}},
                     "methods": {m: {"best": best, "train_seconds": [10.0, 20.0]} for m, best in methods.items()}}
               for row in ("a@100", "b@100")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "details.json").write_text(json.dumps(details))


def test_gaps_per_row_and_averaged(tmp_path, transfer_table):
    write_sweep(tmp_path, {"ft": [70.0, 72.0], "kd": [72.0, 74.0], "matekd": [74.0, 75.0]})
    lines = transfer_table.gaps(tmp_path).splitlines()
    assert lines[0] == "a@100: MATE-KD − KD +1.50, KD − FT +2.00"
    assert lines[-1] == "average over 2 rows: MATE-KD − KD +1.50, KD − FT +2.00"


def test_an_arm_names_its_own_methods_and_finds_agreement_under_runs(tmp_path, transfer_table):
    arm, runs = tmp_path / "arm", tmp_path / "runs"
    write_sweep(arm, {"ft-e10": [70.0], "kd-e10": [71.0], "matekd-e10": [70.5]})
    (runs / "a" / "n100").mkdir(parents=True)
    (runs / "a" / "n100" / "agreement.json").write_text(json.dumps({"runs": {
        "kd-e10-seed1": {"acc": 0.7, "acc_perturbed": 0.61, "agree_perturbed": 0.8, "acc_perturbed_kept": 0.7},
        # measured before acc_perturbed_kept
        "kd-e10-seed2": {"acc": 0.7, "acc_perturbed": 0.63, "agree_perturbed": 0.9},
        "matekd-e10-seed1": {"acc": 0.71, "acc_perturbed": 0.60, "agree_perturbed": 0.9,
                             "acc_perturbed_kept": 0.75}}}))
    assert transfer_table.gaps(arm) == ""  # no ft/kd/matekd in this arm
    assert transfer_table.gaps(arm, "ft-e10", "kd-e10", "matekd-e10").splitlines()[-1] == \
        "average over 2 rows: MATE-KD − KD -0.50, KD − FT +1.00"
    rows = transfer_table.table(arm, ["kd-e10"], runs).splitlines()[2:]
    assert rows[0] == ("| a@100 | 90.00 | 20.0% | kd-e10 | 71.00 ± 0.00 (n=1) | 70.00 ± 0.00 (n=2) "
                       "| 62.00 ± 1.41 (n=2) | 70.00 ± 0.00 (n=1) | 85.00 ± 7.07 (n=2) | 15 s |")
    assert "| – | – | – | – |" in rows[1]  # row b has no agreement.json
    lines = transfer_table.measured_gaps(arm, runs, "ft-e10", "kd-e10", "matekd-e10").splitlines()
    assert lines == [  # no ft-e10 measured: no KD − FT
        "a@100 (agreement.json): MATE-KD − KD clean +1.00, MATE-KD − KD perturbed -2.00, "
        "MATE-KD − KD perturbed, label kept +5.00",
        "average (agreement.json): MATE-KD − KD clean +1.00 (1 rows), MATE-KD − KD perturbed -2.00 (1 rows), "
        "MATE-KD − KD perturbed, label kept +5.00 (1 rows)"]
