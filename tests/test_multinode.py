"""A multi-node rehearsal on one machine: two "nodes" of one CPU rank each, started as
`torchrun --nnodes 2 --node_rank {0,1}` with a c10d rendezvous on 127.0.0.1, the way a cluster
without a job launcher starts them (once per node). The losses equal a one-node two-rank run;
a crash then --resume on both nodes completes; nodes that do not share the run directory are
refused at start, on every node, with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import child_env, run_cli
from test_scale import _kd_args, _losses, nodrop_models  # noqa: F401 - nodrop_models: a pytest fixture, shared

from matekd_ds import distributed

ZERO2 = ["deepspeed.student=zero2"]


def two_nodes(args_per_node: list[list[str]], cwd: Path, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start one torchrun per node (one rank each) and wait for both."""
    port = distributed._free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "rehearsal", "-m", "matekd_ds", *args],
                              cwd=cwd, env=child_env({"OMP_NUM_THREADS": "1", **(env or {})}),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for node, args in enumerate(args_per_node)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_two_nodes_match_one_node_and_resume_after_a_crash(nodrop_models, tmp_path):  # noqa: F811 - imported fixture
    one_node = tmp_path / "one_node"
    assert run_cli(_kd_args(nodrop_models, one_node, 8, ZERO2), cwd=tmp_path, ranks=2).returncode == 0
    shared = tmp_path / "shared"
    args = _kd_args(nodrop_models, shared, 8, ZERO2)
    crashed = two_nodes([args, args], tmp_path, env={"MATEKD_CRASH_AFTER_STEP": "4"})
    assert all(r.returncode != 0 for r in crashed)
    assert "simulated crash" in crashed[0].stderr + crashed[1].stderr
    resumed = two_nodes([[*args, "--resume"], [*args, "--resume"]], tmp_path)
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert "resumed at step 3" in resumed[0].stderr
    reference, rehearsal = _losses(one_node), _losses(shared)
    assert sorted(rehearsal) == sorted(reference)
    for step, loss in reference.items():
        assert abs(rehearsal[step] - loss) <= 5e-5, (step, loss, rehearsal[step])


def test_nodes_without_a_shared_run_directory_are_refused(nodrop_models, tmp_path):  # noqa: F811 - imported fixture
    per_node = [_kd_args(nodrop_models, tmp_path / f"node{node}", 8, ZERO2) for node in (0, 1)]
    results = two_nodes(per_node, tmp_path)
    for result in results:  # torchrun reports a failed child with its own summary and exit 1
        assert result.returncode != 0, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("matekd: error: ")]
        assert len(errors) == 1 and "output.dir differs between ranks" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "node0").exists() and not (tmp_path / "node1").exists()
