"""The edges a fault catalogue still found (issue 26), through real processes on tiny models:
resuming with a changed precision, ZeRO stage, offload or world size; a disk that fills mid-run;
checkpoint damage the manifest does not cover; damaged exports; stop signals during start-up and
the advice that follows them; the process group's port; and the divergence message, the exit code
of an unusable checkpoint and the lock of a finished run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import child_env, run_cli
from test_recovery import FAST, assert_one_line_error, assert_same_run, metrics, train

# A run crashed after step 3 of its student phase: a fine-tuned teacher/ export (5 steps),
# student-phase checkpoints at steps 0 and 2, fp32 at ZeRO-2 on one rank. Every command on it
# repeats CRASHED (a resume keeps the models keys).
CRASHED = ("models.teacher_finetune_epochs=0.2",)
CRASHED_AT = "3:student"
# Start-up and port tests need no training worth the name.
SHORT = ["task=synthetic", "data.synthetic.train_size=64", "data.synthetic.dev_size=16", "train.micro_batch_size=8",
         "models.teacher_finetune_epochs=0", "train.max_steps=2", "eval.every_steps=2", "logging.progress=false",
         "matekd.generator_steps=1", "matekd.student_steps=1"]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crashed") / "run"
    result = train(out, *CRASHED, env={"MATEKD_CRASH_AFTER_STEP": CRASHED_AT})
    assert result.returncode == 1 and metrics(out)["status"] == "failed", result.stderr[-3000:]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def only_matekd_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("matekd:")]


# ---------------------------------------------------------------------------------------------
# 1. A resume keeps the precision, ZeRO stage, offload and world size its checkpoints were written with


# (a refusal that did not come would wait for rank 1 at the rendezvous: bounded)
WORLD_OF_TWO = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                "MATEKD_COLLECTIVE_TIMEOUT_S": "30"}


@pytest.mark.parametrize("change, env, saved, new", [
    ("train.dtype=bf16", None, "train.dtype fp32", "bf16"),
    ("deepspeed.student=zero2+offload", None, "the student's optimizer offload none", "cpu"),
    ("deepspeed.generator=zero3", None, "the generator's ZeRO stage 2", "3"),
    (None, WORLD_OF_TWO, "world size 1", "2"),  # rank 0 of a 2-rank launch: refused before any rendezvous
])
def test_a_changed_layout_is_refused_before_anything_runs(crashed, tmp_path, change, env, saved, new):
    out = copy_of(crashed, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.json")}
    result = train(out, *CRASHED, *([change] if change else []), env=env, flags=("--resume",))
    assert_one_line_error(result, f"were written with {saved}, this run has {new}", code=2)
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing was written


def test_a_bf16_run_resumed_without_bf16_is_refused(tmp_path):
    out = tmp_path / "run"
    quick = ("models.teacher_finetune_epochs=0", "train.dtype=bf16")
    assert train(out, *quick, env={"MATEKD_CRASH_AFTER_STEP": "1:student"}).returncode == 1
    result = train(out, "models.teacher_finetune_epochs=0", flags=("--resume",))
    assert_one_line_error(result, "were written with train.dtype bf16, this run has fp32", code=2)


def test_a_bf16_single_rank_run_resumes_bit_identically(tmp_path):
    """bf16 at world size 1 trains with DeepSpeed's BF16_Optimizer (engines.single_rank_ds_config):
    its checkpoints give back the run that never stopped, and only to an engine of that kind."""
    quick = ("models.teacher_finetune_epochs=0", "train.dtype=bf16")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(whole, *quick).returncode == 0
    assert train(broken, *quick, env={"MATEKD_CRASH_AFTER_STEP": "7:student"}).returncode == 1
    refused = train(broken, *quick, "deepspeed.single_rank_fast_path=false", flags=("--resume",))
    assert_one_line_error(refused, "written with deepspeed.single_rank_fast_path true (bf16: BF16_Optimizer), "
                                   "this run has False", code=2)
    resumed = train(broken, *quick, flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(whole, broken)


# ---------------------------------------------------------------------------------------------
# 2. A disk that fills mid-run: "failed" and its reason are recorded all the same


def _mount_namespace() -> list[str] | None:
    """A command prefix whose child may mount a tmpfs that only it sees (root, or unprivileged
    user namespaces), or None."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which("unshare") is None:
            return None
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.parametrize("point, phase", [("opened", "teacher"), ("warmup", "student")])
def test_a_disk_that_fills_mid_run_records_failed_with_the_reason(tmp_path, point, phase):
    """Filled at the boundary, the filesystem has no byte free for the next write: the scalar
    log's in the teacher's fine-tuning, the first checkpoint in the student phase."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs root or unprivileged user namespaces)")
    mount, copy = tmp_path / "disk", tmp_path / "after"
    mount.mkdir()
    command = [sys.executable, "-m", "matekd_ds", "train", *FAST, *(CRASHED if phase == "teacher" else
               ("models.teacher_finetune_epochs=0",)), f"output.dir={mount / 'run'}"]
    script = (f"mount -t tmpfs -o size=160m tmpfs {mount} && cd {mount} || exit 99\n"
              f"{' '.join(command)}; rc=$?\ncp -a {mount / 'run'} {copy}; exit $rc\n")
    result = subprocess.run([*prefix, "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=child_env({"MATEKD_FAULT_AT": f"{point}:fill-disk"}), timeout=600)
    assert_one_line_error(result, "could not write", code=1)
    m = metrics(copy)
    assert m["status"] == "failed" and "no space left on device" in m["reason"].lower(), m
    assert not [p for p in copy.rglob("*") if ".tmp" in p.name]
    assert not (copy / ".lock").exists() and not (copy / ".reserve").exists()
    if phase == "student":
        assert "checkpoint step_00000000 could not be written (No space left on device)" in m["reason"], m


# ---------------------------------------------------------------------------------------------
# 3 and 8. Damage the manifest does not cover falls back; no usable checkpoint at all is a failed run


def _drop_from_manifest(run: Path, tag: str, rel: str) -> None:
    path = run / "checkpoints/student/trainer" / tag / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    del manifest["files"][rel]
    path.write_text(json.dumps(manifest))


def test_a_truncated_file_missing_from_the_manifest_falls_back_to_the_previous_checkpoint(crashed, tmp_path):
    out = copy_of(crashed, tmp_path)
    rel = "student/step_00000002/mp_rank_00_model_states.pt"
    victim = out / "checkpoints/student" / rel
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _drop_from_manifest(out, "step_00000002", rel)
    resumed = train(out, *CRASHED, "train.max_steps=4", flags=("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "step_00000002 skipped" in warnings[0] and "not in the manifest" in warnings[0]
    assert "resumed at step 0" in resumed.stderr and "Traceback" not in resumed.stderr
    assert metrics(out)["status"] == "completed" and not (out / ".lock").exists()


def test_no_usable_checkpoint_is_a_failed_run_not_bad_input(crashed, tmp_path):
    out = copy_of(crashed, tmp_path)
    for tag in ("step_00000000", "step_00000002"):
        flip_a_byte(out / "checkpoints/student/student" / tag / "mp_rank_00_model_states.pt")
    result = train(out, *CRASHED, flags=("--resume",))
    assert_one_line_error(result, "no checkpoint under", code=1)  # exit 2 is for bad input found before writing
    m = metrics(out)
    assert m["status"] == "failed" and "CheckpointUnusable" in m["reason"]


# ---------------------------------------------------------------------------------------------
# 4. Exports carry a manifest; eval, predict and a resume check it


def test_exports_carry_a_manifest_of_what_loaders_read(crashed):
    from matekd_ds.checkpoint import verify_export

    manifest = json.loads((crashed / "teacher/MANIFEST.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest)
    verify_export(crashed / "teacher")


def test_a_model_folder_without_a_manifest_or_with_a_new_card_is_accepted(crashed, tmp_path):
    from matekd_ds.checkpoint import verify_export
    from matekd_ds.errors import MatekdError

    elsewhere = tmp_path / "model"
    shutil.copytree(crashed / "teacher", elsewhere)
    (elsewhere / "README.md").write_text("a card rewritten after the export")
    verify_export(elsewhere)
    (elsewhere / "extra.bin").write_bytes(b"weights nobody listed")
    with pytest.raises(MatekdError, match="extra.bin is not in its manifest"):
        verify_export(elsewhere)
    (elsewhere / "MANIFEST.json").unlink()  # a model from elsewhere: taken as it is
    verify_export(elsewhere)


@pytest.mark.parametrize("command", ["eval", "predict", "resume"])
def test_a_damaged_export_is_refused_by_eval_predict_and_resume(crashed, tmp_path, command):
    out = copy_of(crashed, tmp_path)
    flip_a_byte(out / "teacher/model.safetensors")
    if command == "resume":
        result = train(out, *CRASHED, flags=("--resume",))
    else:
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in ("a fine film", "not good at all")))
        extra = ["--data", str(rows)] + (["--out", str(tmp_path / "p.tsv")] if command == "predict" else [])
        result = run_cli([command, str(out / "teacher"), *extra], cwd=tmp_path)
    assert_one_line_error(result, f"model {out / 'teacher'} is damaged: model.safetensors does not match", code=2)
    assert not (tmp_path / "p.tsv").exists()


# ---------------------------------------------------------------------------------------------
# 5 and 6. Stop signals during start-up: one line, and advice that works


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (sig - 1)))


FIRST_SECOND = 1.0


def _signal_during_start_up(command: list[str], cwd: Path, sig: int, delay: float) -> tuple[int, str]:
    """Start `command`; once matekd has a SIGTERM handler (its first act, while torch and the
    rest are still being imported), or at the latest FIRST_SECOND after the launch, wait `delay`
    seconds, send `sig`, and wait for the process to end."""
    proc = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    launched = time.time()
    while not _catches(proc.pid, signal.SIGTERM) and time.time() - launched < FIRST_SECOND:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0), (signal.SIGINT, 0.5)])
def test_a_stop_during_start_up_is_one_line_and_its_advice_works(tmp_path, sig, delay):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "matekd_ds", "train", *SHORT, f"output.dir={out}"]
    code, stderr = _signal_during_start_up(command, tmp_path, sig, delay)
    lines = only_matekd_lines(stderr)
    assert code in (128 + sig, 143) and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("matekd: stopped") and "run the same command again" in lines[0], lines
    assert not out.exists()
    if delay:  # the advice, followed
        again = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]


def test_a_stop_while_loading_advises_what_works(tmp_path):
    """The stop is taken at the first safe point, with the inputs loaded and nothing written: the
    advice is the same command, not --resume (which would find nothing to resume)."""
    out = tmp_path / "run"
    first = run_cli(["train", *SHORT, f"output.dir={out}"], cwd=tmp_path, env={"MATEKD_FAULT_AT": "loaded:sigterm"})
    assert first.returncode == 143, first.stderr[-3000:]
    assert only_matekd_lines(first.stderr) == [
        "matekd: stopped before the run started (nothing was written); run the same command again"]
    again = run_cli(["train", *SHORT, f"output.dir={out}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_stop_to_the_experiment_runner_before_its_first_job_is_one_line(tmp_path):
    spec = {"output_dir": str(tmp_path / "sweep"), "methods": ["ft"], "seeds": [1],
            "tasks": {"synthetic": {"data": {"synthetic": {"train_size": 64, "dev_size": 16}}}},
            "base": {"train": {"max_steps": 2, "micro_batch_size": 8}, "logging": {"progress": False}},
            "teacher": {"model": "builtin:tiny-teacher", "finetune": {"train": {"max_steps": 2}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, stderr = _signal_during_start_up([sys.executable, "-m", "matekd_ds", "experiment", str(path)], tmp_path,
                                           signal.SIGTERM, 0.0)
    lines = only_matekd_lines(stderr)
    assert code == 143 and len(lines) == 1 and lines[0].startswith("matekd: stopped"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Traceback" not in "".join(p.read_text() for p in tmp_path.rglob("*.log"))


# ---------------------------------------------------------------------------------------------
# 7. The process group's port


PORT_TAKEN = textwrap.dedent('''
    import socket, sys
    from matekd_ds import distributed

    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    distributed._free_port = lambda: taken.getsockname()[1]  # the port another run takes first
    distributed.init()
    distributed.barrier()
    print("world", distributed.world_size(), "formed")
''')


def test_a_single_rank_run_needs_no_port_another_process_could_take(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PORT_TAKEN)
    result = run_cli([], tmp_path, script=script, timeout=300)
    assert result.returncode == 0 and "world 1 formed" in result.stdout, result.stderr[-3000:]


def test_a_multi_rank_start_on_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env = {**WORLD_OF_TWO, "MASTER_PORT": str(taken.getsockname()[1])}
        result = run_cli(["train", *SHORT, f"output.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert_one_line_error(result, "could not form the process group", code=1)
    assert "another port" in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 8. Divergence names the engine and a checkpoint that exists; a finished run leaves no lock


def test_divergence_in_teacher_fine_tuning_names_the_teacher_and_an_existing_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(out, env={"MATEKD_NAN_AFTER_STEP": "5:teacher"})
    assert_one_line_error(result, "training diverged at step", code=1)
    line = only_matekd_lines(result.stderr)[0]
    assert "teacher" in line.split(";")[0] and "student" not in line, line
    where = Path(line.rsplit("the last finite checkpoint: ", 1)[1])
    assert where.is_dir() and (where / "MANIFEST.json").is_file(), where
    assert metrics(out)["status"] == "diverged" and not (out / ".lock").exists()


def test_a_finished_run_leaves_no_lock(crashed):
    assert metrics(crashed)["status"] == "failed"
    assert not (crashed / ".lock").exists() and not (crashed / ".reserve").exists()


def test_the_lock_is_taken_over_only_while_it_is_on_disk(tmp_path):
    """A run that ends removes its lock; one that opened the old file just before cannot take it."""
    from matekd_ds.run_dir import LOCK, RunDir

    first, second = RunDir(tmp_path), RunDir(tmp_path)
    first.lock()
    stale = os.open(tmp_path / LOCK, os.O_RDWR)  # opened by a latecomer before the first run ends
    first.unlock()
    assert not (tmp_path / LOCK).exists()
    second.lock()  # a new lock file, not the removed one
    assert (tmp_path / LOCK).is_file()
    assert os.fstat(stale).st_ino != os.stat(tmp_path / LOCK).st_ino
    os.close(stale)
    second.unlock()

