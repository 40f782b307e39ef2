"""benchmarks/bench_train.py times what `matekd train` ships: its project side, built from a preset
(a run config) by the run factory, gives exactly the losses `matekd train` logs on that preset,
step for step. End to end on a small real-text file: every series runs, the result lines come out
in their documented order, length grouping removes padding, and bad input stops with one line.
(Its timings are not checked: this machine is shared and noisy.)"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, load_benchmark_script
from transformers import AutoModelForMaskedLM

from matekd_ds import pipeline
from matekd_ds.assembly import run_inputs
from matekd_ds.callbacks import RunCallback
from matekd_ds.config import load_config
from matekd_ds.errors import MatekdError
from matekd_ds.models import builtin_config
from matekd_ds.trainer import seed_phase

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
    names = [line.split(":")[0] for line in lines[-7:]]
    assert names == ["padding_fraction", "group_by_length_tokens_per_s", "single_rank_fast_path_speedup",
                     "overhead_vs_floor_generator", "overhead_vs_floor", "matekd_over_kd_time", "speedup"]
    ungrouped, grouped, epoch_ungrouped, epoch_grouped = map(float, re.findall(r"\d\.\d+", lines[-7]))
    assert ungrouped > 0.3 and epoch_ungrouped > 0.3  # 3-word and 40-word questions share batches
    assert grouped < ungrouped / 2 and epoch_grouped < epoch_ungrouped / 2
    assert all(float(line.split(":")[1]) > 0 for line in lines[-6:])
    # MATE-KD does KD's student work on twice the rows, plus the teacher and the generator
    assert float(lines[-2].split(":")[1]) > 1.5


def test_unreadable_data_is_one_line_and_nonzero(tmp_path):
    data = tmp_path / "questions.tsv"
    write_questions(data)
    result = bench("--data", str(data), 'data.text_columns=["sentence"]')  # class names, no label_names
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bench_train: error:")
    assert "needs data.label_names" in result.stderr


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "benchmarks" / "presets").glob("*.yaml")))
def test_every_benchmark_preset_is_a_run_config(preset, monkeypatch):
    """What `matekd train --config benchmarks/presets/<preset>` reads: valid keys and values, and
    builtin models whose shapes parse (built on the meta device: no memory). A model named by a
    variable (${MINILM}) is a folder on the user's machine: only the config is checked here."""
    monkeypatch.setenv("MINILM", "/models/all-MiniLM-L6-v2")
    cfg = load_config(REPO / "benchmarks" / "presets" / preset)
    assert cfg.method == "matekd" and cfg.models.teacher_finetune_epochs == 0
    for role in ("teacher", "student", "generator"):
        spec = getattr(cfg.models, role)
        if not spec.startswith("builtin:"):
            assert spec == "/models/all-MiniLM-L6-v2", spec
            continue
        with torch.device("meta"):
            model = AutoModelForMaskedLM.from_config(builtin_config(spec, 100, 0))
        assert model.get_input_embeddings().weight.shape[0] >= 100


def test_the_figures_table_prints_mfu_where_kd_and_the_floor_have_none(capsys):
    # On a GPU the project has an MFU but KD's model FLOPs are not counted (mfu None); the first
    # H200 run crashed formatting that None after every series had been measured.
    bench_train = load_benchmark_script("bench_train.py")
    series = {"samples_per_s": 10.0, "tokens_per_s": 100.0, "padding_fraction": 0.5,
              "generator_step_s_median": 0.1, "student_step_s_median": 0.05, "peak_memory_extra_bytes": 2**20}
    figures = {"project": dict(series, mfu=0.049, breakdown_s={}), "kd": dict(series, mfu=None),
               "reference": dict(series, mfu=0.033), "floor": dict(series)}
    bench_train.print_figures(figures)
    mfu_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("MFU"))
    assert mfu_line.split()[1:] == ["4.9%", "n/a", "3.3%", "n/a"]


def test_a_preset_whose_model_package_is_missing_is_one_line(monkeypatch):
    bench_train = load_benchmark_script("bench_train.py")
    monkeypatch.delenv("MINILM", raising=False)
    monkeypatch.setitem(bench_train.PRESET_MODELS, "MINILM", ("matekd_no_such_package", "no-such-package"))
    with pytest.raises(MatekdError, match="preset minilm-sst2 needs the no-such-package package"):
        bench_train.load_preset("minilm-sst2", [])


def test_a_preset_is_a_run_config_and_bad_overrides_are_one_line():
    result = bench("train.no_such_key=1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "bench_train: error: unknown config key 'train.no_such_key' (valid keys here: " + \
        result.stderr.strip().split("valid keys here: ", 1)[1]


class StudentLosses(RunCallback):
    """Every student-phase step's losses, as the trainer's loop saw them."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_step_end(self, event) -> bool:
        if event.phase == "student":
            self.steps.append({k: float(v) for k, v in event.losses.items()})
        return False


@pytest.fixture
def own_signal_handlers():
    """run_training installs the run's SIGTERM/SIGINT handlers in this process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_benchmark_steps_exactly_what_matekd_train_trains(tmp_path, own_signal_handlers):
    """The benchmark's project side (bench_train.project_side on a preset) stepped on the batches
    and seeds the trainer draws gives the losses `matekd train` (pipeline.run_training on the
    same preset) computes, bit for bit, over full generator and student cycles."""
    bench_train = load_benchmark_script("bench_train.py")
    steps = 2 * bench_train.cycle_length(bench_train.load_preset("cpu-tiny", []))
    cfg = bench_train.load_preset("cpu-tiny", [
        f"output.dir={tmp_path / 'run'}", f"train.max_steps={steps}", "data.synthetic.train_size=400",
        "data.synthetic.dev_size=40", "eval.every_steps=0", "output.checkpoint_every=0", "logging.progress=false",
        "logging.tensorboard=false"])
    trained = StudentLosses()
    pipeline.run_training(cfg, callbacks=[trained])
    assert len(trained.steps) == steps

    inputs = run_inputs(cfg)
    side = bench_train.project_side(inputs)
    batches = bench_train.run_batches(inputs, steps)
    seed_phase(cfg.train.seed, "student", 0)  # as the trainer does when its phase starts
    timed = []
    for n, batch in enumerate(batches):
        timed.append({k: float(v) for k, v in side.step(batch, n, bench_train.step_seed(cfg, n)).items()})
    assert [side.trains(n) for n in range(steps)].count("generator") == 2
    assert timed == trained.steps
    assert all(torch.isfinite(torch.tensor(list(losses.values()))).all() for losses in timed)
