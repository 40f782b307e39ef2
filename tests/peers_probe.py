"""Two gloo ranks (torchrun) with matekd_ds.peers' heartbeat; after both have beaten, rank 1
goes away ("dead": it exits at once, as after kill -9) or stops answering collectives while its
heartbeat goes on ("stuck"). Rank 0's next collective fails; it writes its one line to OUT.
    torchrun --nproc_per_node 2 tests/peers_probe.py dead|stuck OUT
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from matekd_ds import distributed, peers

os.environ[distributed.COLLECTIVE_TIMEOUT_ENV] = "3"
TIMEOUT_S = distributed.collective_timeout().total_seconds()

mode, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo", timeout=distributed.collective_timeout())
peers.start()
dist.barrier()
time.sleep(2.5 * peers.BEAT_S)  # every heartbeat has moved
if dist.get_rank() == 1:
    if mode == "stuck":  # alive, beating, but never at the collective: until rank 0 has judged
        time.sleep(TIMEOUT_S + peers.JUDGE_S + 2)
    os._exit(0)  # no goodbye: the connections just close
try:
    dist.all_reduce(torch.ones(1))
    out.write_text("the collective did not fail")
except RuntimeError as err:
    failed = peers.is_collective_failure(err)
    out.write_text(peers.lost_peer_line(err) if failed else f"not a collective failure: {err}")
os._exit(0)
