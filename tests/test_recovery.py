"""Recovery at every moment of a run, through the CLI on tiny models: crashes, kill -9 and SIGTERM
at each phase boundary, non-finite training, two runs into one directory, a full disk, and
--resume / --auto-resume. A resumed run must end bit-identical to an uninterrupted one."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import child_env, run_cli
from safetensors.torch import load_file

# The reproduction: teacher fine-tuning (25 steps), then 12 MATE-KD steps in 2:3 cycles,
# checkpoints every 2 steps, evaluations every 4.
FAST = ["task=synthetic", "train.max_steps=12", "data.synthetic.train_size=200", "data.synthetic.dev_size=50",
        "eval.every_steps=4", "train.micro_batch_size=8", "models.teacher_finetune_epochs=1",
        "output.checkpoint_every=2", "matekd.generator_steps=2", "matekd.student_steps=3", "train.lr=1e-3",
        "matekd.generator_lr=1e-4", "logging.progress=false", "logging.log_every=2"]


def train(out: Path, *extra: str, env: dict | None = None, flags: tuple[str, ...] = ()):
    return run_cli(["train", *flags, *FAST, *extra, f"output.dir={out}"], cwd=out.parent, env=env)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_one_line_error(result, fragment: str, code: int) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("matekd: error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical student and the same evaluations."""
    wa, wb = load_file(a / "student/model.safetensors"), load_file(b / "student/model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma, mb = metrics(a), metrics(b)
    assert ma["status"] == mb["status"] == "completed"
    assert not (a / ".lock").exists() and not (b / ".lock").exists()  # a finished run leaves no lock
    assert ma["evaluations"] == mb["evaluations"] and ma["teacher"]["dev"] == mb["teacher"]["dev"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------
# Interrupted at a phase boundary, then resumed


@pytest.mark.parametrize("fault", ["teacher:crash", "teacher:sigkill", "opened:sigkill", "crash-student-step-1"])
def test_interrupted_at_a_phase_boundary_resumes_bit_identically(tmp_path, reference, fault):
    out = tmp_path / "run"
    env = {"MATEKD_CRASH_AFTER_STEP": "1:student"} if fault.startswith("crash-student") else {"MATEKD_FAULT_AT": fault}
    first = train(out, env=env)
    assert first.returncode != 0
    if fault.endswith("sigkill"):
        assert first.returncode == -signal.SIGKILL
        assert (out / "config.yaml").is_file()  # killed after the run directory was opened
        if (out / "metrics.json").is_file():
            assert metrics(out)["status"] == "running"  # killed: nothing could record it
    else:
        assert metrics(out)["status"] == "failed" and "simulated crash" in metrics(out)["reason"]
    resumed = train(out, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)


def test_sigterm_between_phases_records_interrupted_and_resumes(tmp_path, reference):
    out = tmp_path / "run"
    first = train(out, env={"MATEKD_FAULT_AT": "teacher:sigterm"})
    assert first.returncode == 143, first.stderr[-3000:]
    assert "stopped after the teacher phase; continue with --resume" in first.stderr
    assert metrics(out)["status"] == "interrupted"
    assert train(out, flags=("--resume",)).returncode == 0
    assert_same_run(reference, out)


def test_killed_after_the_generator_warm_up_resumes_bit_identically(tmp_path):
    warm = ("matekd.generator_mlm_warmup_steps=4",)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(whole, *warm).returncode == 0
    first = train(broken, *warm, env={"MATEKD_FAULT_AT": "warmup:sigkill"})
    assert first.returncode == -signal.SIGKILL and (broken / "generator_warm/config.json").is_file()
    resumed = train(broken, *warm, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(whole, broken)
    warm_a, warm_b = metrics(whole)["generator_warmup"], metrics(broken)["generator_warmup"]
    assert {k: v for k, v in warm_a.items() if k != "train_seconds"} == \
        {k: v for k, v in warm_b.items() if k != "train_seconds"}


def test_sigterm_while_loading_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = train(out, env={"MATEKD_FAULT_AT": "loaded:sigterm"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert "stopped before the run started (nothing was written); run the same command again" in result.stderr
    assert not out.exists()


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_previous(tmp_path, reference):
    out = tmp_path / "run"
    assert train(out, env={"MATEKD_CRASH_AFTER_STEP": "7:student"}).returncode != 0
    newest = out / "checkpoints/student/student/step_00000006/mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))
    resumed = train(out, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000006 skipped" in resumed.stderr and "resumed at step 4" in resumed.stderr
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------------------------
# Non-finite training


def test_non_finite_training_stops_as_diverged_and_exports_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    result = train(out, env={"MATEKD_NAN_AFTER_STEP": "5"})  # the student's weights turn NaN after step 5
    assert_one_line_error(result, "training diverged at step", code=1)
    line = next(text for text in result.stderr.splitlines() if text.startswith("matekd: error: "))
    assert Path(line.rsplit("the last finite checkpoint: ", 1)[1]).is_dir(), line  # a folder that exists
    m = metrics(out)
    assert m["status"] == "diverged" and "diverged" in m["reason"]
    assert not (out / "student").exists()
    best = load_file(out / "student_best/model.safetensors")  # exported at step 4, before the NaN
    assert all(torch.isfinite(t).all() for t in best.values())
    latest = (out / "checkpoints/student/LATEST").read_text()
    assert int(latest.split("_")[1]) <= 5
    state = torch.load(out / f"checkpoints/student/student/{latest}/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------
# One run per directory


def test_a_directory_in_use_is_refused_with_its_holder(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with open(out / ".lock", "w") as held:  # this test process plays the running matekd
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"pid {os.getpid()} on host testhost")
        held.flush()
        refused = train(out, flags=("--resume",))
    assert_one_line_error(refused, f"is in use by a running matekd (pid {os.getpid()} on host testhost)", code=2)
    # The lock is free once its holder is gone, even though the file stays: taken over.
    taken_over = train(out, flags=("--resume",))
    assert taken_over.returncode == 0, taken_over.stderr[-3000:]


def test_two_runs_started_together_into_one_directory(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "matekd_ds", "train", *FAST, f"output.dir={out}"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by a running matekd" in loser or "already holds files" in loser
    assert metrics(out)["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# Writing fails


def _file_size_limit(limit: int):
    """In the child: files larger than `limit` bytes cannot be written (EFBIG), as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_ends_as_failed_with_the_last_checkpoint_intact(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = sorted(p.name for p in (out / "checkpoints/student/trainer").iterdir())
    command = [sys.executable, "-m", "matekd_ds", "train", "--resume", *FAST, "train.max_steps=16", f"output.dir={out}"]
    result = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                            preexec_fn=_file_size_limit(300_000), timeout=600)
    assert_one_line_error(result, "could not write", code=1)
    m = metrics(out)
    assert m["status"] == "failed" and "step_00000014" in m["reason"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.tmp*"))
    assert sorted(p.name for p in (out / "checkpoints/student/trainer").iterdir()) == before
    assert (out / "checkpoints/student/LATEST").read_text() == "step_00000012"
    from matekd_ds.checkpoint import Checkpointer

    assert Checkpointer(out / "checkpoints/student", 2).verify(["student", "generator"], "step_00000012") is None


# ---------------------------------------------------------------------------------------------
# --resume and --auto-resume


def test_resume_needs_something_to_resume(tmp_path):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        result = train(out, flags=("--resume",))
        assert_one_line_error(result, "nothing to resume", code=2)


def test_auto_resume_starts_fresh_then_resumes(tmp_path):
    out = tmp_path / "run"
    first = train(out, flags=("--auto-resume",))
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(out, "train.max_steps=14", flags=("--auto-resume",))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 12" in again.stderr and metrics(out)["student"]["steps"] == 14


def test_the_same_stop_delivered_twice_is_one_stop_and_a_later_second_gives_up(monkeypatch):
    """Ctrl-C reaches the job directly and through `matekd experiment`: a second signal within
    DUPLICATE_WINDOW_S is that same stop; a second one later gives up at once."""
    from matekd_ds import signals

    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(signals, "_requested", False)
    signals._on_signal(signal.SIGINT, None)
    assert signals.requested()
    clock[0] += signals.DUPLICATE_WINDOW_S / 2
    signals._on_signal(signal.SIGINT, None)  # the duplicate: still just a stop request
    clock[0] += signals.DUPLICATE_WINDOW_S
    with pytest.raises(KeyboardInterrupt):
        signals._on_signal(signal.SIGTERM, None)
