"""benchmarks/bench_train.py end to end on a small real-text file: every series runs, the result
lines come out in their documented order, length grouping removes padding, and a file it cannot
read stops with one line. (Its timings are not checked: this machine is shared and noisy.)"""

from __future__ import annotations

import random
import re
import subprocess
import sys

from helpers import REPO, child_env

BENCH = REPO / "benchmarks" / "bench_train.py"
CLASSES = ["DESC", "ENTY", "HUM"]
WORDS = "what who how many when where did the a of river city first name is was".split()


def write_questions(path, rows: int = 120) -> None:
    """Questions of very different lengths (3..40 words), labels as class names."""
    rng = random.Random(0)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.choice([3, 4, 5, 20, 30, 40]))]
        lines.append(" ".join(words) + " ?\t" + rng.choice(CLASSES))
    path.write_text("\n".join(lines) + "\n")


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--preset", "cpu-tiny", "--no-save", *args],
                          cwd=REPO / "benchmarks", env=child_env({"OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=600)


def test_real_text_benchmark_reports_padding_grouping_floor_and_speedup(tmp_path):
    data = tmp_path / "questions.tsv"
    write_questions(data)
    result = bench("--data", str(data), "--repeats", "1", "--cycles", "1", "--ablate-fast-path",
                   "matekd.student_steps=3", "train.micro_batch_size=4", 'data.text_columns=["sentence"]',
                   f"data.label_names={CLASSES}".replace("'", '"'))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    names = [line.split(":")[0] for line in lines[-6:]]
    assert names == ["padding_fraction", "group_by_length_tokens_per_s", "single_rank_fast_path_speedup",
                     "overhead_vs_floor_generator", "overhead_vs_floor", "speedup"]
    ungrouped, grouped, epoch_ungrouped, epoch_grouped = map(float, re.findall(r"\d\.\d+", lines[-6]))
    assert ungrouped > 0.3 and epoch_ungrouped > 0.3  # 3-word and 40-word questions share batches
    assert grouped < ungrouped / 2 and epoch_grouped < epoch_ungrouped / 2
    assert all(float(line.split(":")[1]) > 0 for line in lines[-5:])


def test_unreadable_data_is_one_line_and_nonzero(tmp_path):
    data = tmp_path / "questions.tsv"
    write_questions(data)
    result = bench("--data", str(data), 'data.text_columns=["sentence"]')  # class names, no label_names
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bench_train: error:")
    assert "unknown label" in result.stderr
