"""The one line a survivor prints when a collective fails (matekd_ds/peers.py): two gloo ranks
under torchrun, one of which dies (named as lost, with its host) or is stuck while alive (not
blamed). The cluster rehearsal (tests/test_local_cluster.py) shows the same across two network
namespaces, where it can run."""

from __future__ import annotations

import socket

import pytest
from helpers import REPO, run_cli

from matekd_ds import peers


@pytest.mark.parametrize("mode, expected", [
    ("dead", f"lost rank 1 on {socket.gethostname()}: a collective failed ("),
    ("stuck", "though every rank still answers: one is stuck, or worked alone longer than the collective timeout (3s"),
])
def test_the_survivor_names_a_dead_rank_and_blames_no_live_one(tmp_path, mode, expected):
    out = tmp_path / "line.txt"
    result = run_cli([], cwd=tmp_path, ranks=2, launcher="torchrun", timeout=120,
                     script=REPO / "tests" / "peers_probe.py", script_args=[mode, str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    line = out.read_text()
    assert expected in line and line.endswith("rerun the same command with --resume once every node is back"), line
    assert "\n" not in line


def test_the_backend_message_is_cut_to_what_it_says():
    closed = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[10.77.0.2]:29326. This is typically caused by a remote worker crashing. Check the logs")
    assert peers.is_collective_failure(closed)
    assert peers._backend_says(closed) == "Connection closed by peer [10.77.0.2]:29326"
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 20000ms for send "
                             "operation to complete")
    assert peers._backend_says(timed_out) == "Timed out waiting 20000ms for send operation to complete"
    assert not peers.is_collective_failure(RuntimeError("CUDA out of memory"))
    named = peers._ranks_on_hosts([2, 3, 5], {2: "node1", 3: "node1"})
    assert named == "ranks 2, 3 on node1, rank 5 on an unknown host"
