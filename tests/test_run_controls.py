"""benchmarks/quality/run_controls.sh: an unknown set of tasks stops in one line, before anything
is prepared or run."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run_controls.sh"


def test_an_unknown_set_stops_in_one_line_before_preparing_anything(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "cola"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "run_controls.sh: unknown set 'cola' (sst2, subj-trec, glue, rte)"
    assert not (SCRIPT.parents[2] / "runs" / "cola").exists()


def test_no_set_named_prints_the_usage():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode != 0 and "usage: run_controls.sh" in done.stderr
