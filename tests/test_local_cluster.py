"""A cluster on one host (launch/local_cluster.py): two network-namespace nodes joined by veth
pairs, an sshd in each, and the `deepspeed` launcher's own multi-node path (hostfile, pdsh over
ssh) started from node0.

MATE-KD on the offline default data, its teacher a ZeRO-3 engine partitioned across the two nodes
(student and generator ZeRO-2), ends bit-identical to the same 2-rank run on one node: the
student's weights, every evaluation, every logged loss (only timings and throughput differ), and
its traffic crossed the veth link. A node lost mid-run (every process of node1 killed, or its link
taken down) ends the survivor within the collective timeout with one line naming rank 1 on node1;
the same launcher command with --resume, or launch/retry.sh by itself with --auto-resume, then
finishes the run bit-identical to the uninterrupted one.

Skipped, with the reason, where this machine cannot make such a cluster (not root, no `ip netns`,
sshd or pdsh: .ci/run installs openssh-server and pdsh when it can). The --dry-run plan and
launch/retry.sh are tested everywhere.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, run_cli
from safetensors.torch import load_file

TOOL = REPO / "launch" / "local_cluster.py"
RETRY = REPO / "launch" / "retry.sh"
TIMEOUT_S = 20  # the ranks' collective timeout (MATEKD_COLLECTIVE_TIMEOUT_S) in these runs
JUDGE_S = 4  # matekd_ds.peers.JUDGE_S: how long a survivor watches the heartbeats before its line
# The offline default (tiny builtin models, 4000 synthetic training examples) cut short: a 7-step
# teacher fine-tuning, 12 MATE-KD steps in 2:4 cycles, checkpoints every 3 steps.
ARGS = ["train", "deepspeed.teacher=teacher-inference", "deepspeed.student=zero2", "deepspeed.generator=zero2",
        "models.teacher_finetune_epochs=0.1", "train.max_steps=12", "matekd.generator_steps=2",
        "matekd.student_steps=4", "eval.every_steps=6", "output.checkpoint_every=3", "logging.log_every=1",
        "logging.progress=false", "logging.tensorboard=false",
        "eval.deployment_latency=false"]  # rank 0 timing alone would outlast the 20 s collective timeout
TIMING_KEYS = {"throughput", "wall_seconds", "train_seconds", "deployment"}


def _load_tool():
    spec = importlib.util.spec_from_file_location("local_cluster", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_cluster", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


local_cluster = _load_tool()


# ---------------------------------------------------------------------------------------------
# Everywhere: the plan, the retry wrapper


def test_dry_run_prints_the_plan_and_touches_nothing():
    result = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--nodes", "3", "--lose", "link", "--retries",
                             "2", "--", "train", "output.dir=runs/x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("  node")] == [f"  node{i} slots=1" for i in range(3)]
    assert any(line.startswith("node2: ") and "eth0 10.77.0.3/24" in line for line in lines)
    command = shlex.split(next(line for line in lines if line.startswith("from node0: "))[len("from node0: "):])
    assert command[1:] == ["--hostfile", "HOSTFILE", "--launcher", "pdsh", "--master_addr", "node0",
                           "--master_port", "29500", "--module", "matekd_ds", "train", "output.dir=runs/x"]
    environment = next(line for line in lines if line.startswith("rank environment"))
    assert "GLOO_SOCKET_IFNAME=eth0" in environment and "MATEKD_COLLECTIVE_TIMEOUT_S=60" in environment
    assert "ip link set eth0 down on node2" in result.stdout and "up to 2 through launch/retry.sh" in result.stdout


def _retry(tmp_path: Path, fails: int, *args: str, code: int = 255) -> subprocess.CompletedProcess:
    """launch/retry.sh over a command that fails `fails` times with `code`, then succeeds."""
    count = tmp_path / "count"
    fake = tmp_path / "fake.sh"
    fake.write_text(f'#!/bin/sh\nn=$(($(cat {count} 2>/dev/null || echo 0) + 1)); echo $n > {count}\n'
                    f'echo "attempt $n: $*"; [ $n -gt {fails} ] && exit 0; exit {code}\n')
    fake.chmod(0o755)
    env = child_env({"RETRIES": "2", "RETRY_DELAY_S": "0", "RETRY_HOOK": f"echo hook >> {count}.hook"})
    return subprocess.run(["bash", str(RETRY), str(fake), *args], capture_output=True, text=True, timeout=60, env=env)


def test_retry_reruns_a_failed_command_with_its_hook_first(tmp_path):
    result = _retry(tmp_path, 2, "train", "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"attempt {n}: train --auto-resume" for n in (1, 2, 3)]
    assert "retry 2 of 2" in result.stderr and "attempt 3 succeeded" in result.stderr
    assert (tmp_path / "count.hook").read_text() == "hook\nhook\n"


@pytest.mark.parametrize("fails, code, args, runs, fragment", [
    (3, 255, ("train", "--auto-resume"), 3, "attempt 3 failed with exit code 255; not retrying"),  # retries spent
    (3, 2, ("train", "--auto-resume"), 1, "attempt 1 failed with exit code 2; not retrying"),  # bad input
    (3, 143, ("train", "--auto-resume"), 1, "attempt 1 failed with exit code 143; not retrying"),  # stopped
    (3, 255, ("train",), 0, "the command needs --auto-resume"),
])
def test_retry_gives_up_when_a_rerun_cannot_help(tmp_path, fails, code, args, runs, fragment):
    result = _retry(tmp_path, fails, *args, code=code)
    assert result.returncode == (2 if runs == 0 else code)
    assert len(result.stdout.splitlines()) == runs and fragment in result.stderr


# ---------------------------------------------------------------------------------------------
# On a local cluster (root, ip netns, sshd, pdsh)


@pytest.fixture(scope="module")
def cluster_machine():
    problem = local_cluster.missing_prerequisite()
    if problem:
        pytest.skip(f"no local cluster on this machine: {problem}")
    yield
    local_cluster.remove_leftovers()  # whatever a tool killed by a test timeout left behind


def on_cluster(out: Path, *options: str, extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    """launch/local_cluster.py OPTIONS -- ARGS output.dir=OUT EXTRA, and its report; checks that
    it tore everything down."""
    report = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.json')))}.json"
    command = [sys.executable, str(TOOL), "--timeout-s", str(TIMEOUT_S), "--deadline-s", "600", "--report",
               str(report), *options, "--", *ARGS, f"output.dir={out}", *extra]
    result = subprocess.run(command, cwd=out.parent, env=child_env(), capture_output=True, text=True, timeout=900)
    assert report.is_file(), result.stderr[-4000:]
    facts = json.loads(report.read_text())
    assert facts["tag"] not in _namespaces() and not Path(facts["folder"]).exists()
    return result, facts


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_rehearsal_leaves_nothing_behind(cluster_machine, tmp_path, stop):
    tool = subprocess.Popen([sys.executable, str(TOOL), "--", "train", f"output.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in tool.stderr:
            if match := re.search(r"cluster (\S+) up", line):
                break
        tag = match.group(1)
        assert tag in _namespaces()
        tool.send_signal(stop)
        assert tool.wait(timeout=60) == (143 if stop == signal.SIGTERM else -9)
    finally:
        tool.kill()
        tool.wait()
    if stop == signal.SIGKILL:  # no teardown: the next cluster (or a test's finalizer) removes it
        assert tag in _namespaces() and (Path(tempfile.gettempdir()) / f"{tag}-cluster").exists()
        local_cluster.remove_leftovers()
    assert tag not in _namespaces() and not (Path(tempfile.gettempdir()) / f"{tag}-cluster").exists()


@pytest.fixture(scope="module")
def uninterrupted(cluster_machine, tmp_path_factory) -> dict:
    """The same run on one node (2 ranks, `deepspeed --num_gpus 2`) and on two nodes."""
    root = tmp_path_factory.mktemp("cluster")
    one_node = root / "one_node"
    result = run_cli([*ARGS, f"output.dir={one_node}"], cwd=root, ranks=2)
    assert result.returncode == 0, result.stderr[-4000:]
    two_nodes = root / "two_nodes"
    result, facts = on_cluster(two_nodes)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return {"one_node": one_node, "two_nodes": two_nodes, "report": facts}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    return value


def _scalars(run: Path) -> dict[tuple[str, str], str]:
    """Each logged value by (step, name): the last one, for a resumed run; no throughput."""
    with open(run / "logs" / "scalars.csv") as f:
        return {(row["step"], row["name"]): row["value"] for row in csv.DictReader(f)
                if not row["name"].endswith("samples_per_s")}


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert ma["status"] == mb["status"] == "completed" and ma["world_size"] == mb["world_size"] == 2
    assert _without_timings(ma) == _without_timings(mb)
    assert _scalars(a) == _scalars(b)


def test_matekd_on_two_nodes_equals_one_node_and_crosses_the_veth_link(uninterrupted):
    assert_same_run(uninterrupted["one_node"], uninterrupted["two_nodes"])
    counted = uninterrupted["report"]["bytes"]
    for node in ("node0", "node1"):  # the teacher's all-gathers and the gradients' all-reduces
        eth0, lo = counted[node]["eth0"], counted[node]["lo"]
        assert eth0["rx_bytes"] > 10e6 and eth0["tx_bytes"] > 10e6, counted
        assert lo["rx_bytes"] < eth0["rx_bytes"] / 100, counted
    assert counted["node0"]["eth0"]["tx_bytes"] == pytest.approx(counted["node1"]["eth0"]["rx_bytes"], rel=0.01)


def assert_survivor_named_the_lost_node(result: subprocess.CompletedProcess, fault: dict, within_s: float) -> None:
    errors = [line for line in result.stdout.splitlines() if line.startswith("node0: matekd: error: ")]
    assert len(errors) == 1, result.stdout[-4000:]
    assert "lost rank 1 on node1" in errors[0] and "--resume" in errors[0], errors
    assert fault["survivor_line"] == errors[0]
    assert fault["survivor_line_after_s"] <= within_s, fault
    assert fault["attempt_ended_after_s"] <= within_s + 15, fault  # the launcher, pdsh and ssh follow
    assert "Traceback" not in result.stdout.split("holding for")[-1], result.stdout[-4000:]


def test_a_killed_node_ends_the_survivor_at_once_and_resume_finishes_bit_identically(uninterrupted, tmp_path):
    out = tmp_path / "run"
    lost, facts = on_cluster(out, "--lose", "kill", "--lose-after-step", "5:student")
    assert lost.returncode != 0, lost.stdout[-4000:]
    # the killed node's connections close: the collective fails at once, the line follows the heartbeats
    assert_survivor_named_the_lost_node(lost, facts["fault"], within_s=JUDGE_S + 10)
    resumed, _ = on_cluster(out, extra=("--resume",))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed at step 3" in resumed.stdout
    assert_same_run(uninterrupted["two_nodes"], out)


def test_a_cut_off_node_times_out_and_retry_sh_resumes_by_itself(uninterrupted, tmp_path):
    out = tmp_path / "run"
    result, facts = on_cluster(out, "--lose", "link", "--lose-after-step", "5:student", "--retries", "2",
                               extra=("--auto-resume",))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # nothing closes: the survivor waits out the collective timeout, then names the node
    fault = facts["fault"]
    assert fault["survivor_line_after_s"] >= TIMEOUT_S, fault
    assert_survivor_named_the_lost_node(result, fault, within_s=TIMEOUT_S + JUDGE_S + 10)
    assert "launch/retry.sh: attempt 1 failed with exit code 255; retrying" in result.stdout
    assert "launch/retry.sh: attempt 2 succeeded" in result.stdout and "resumed at step 3" in result.stdout
    assert_same_run(uninterrupted["two_nodes"], out)
