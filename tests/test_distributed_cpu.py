"""CPU ranks leave nothing behind: DeepSpeed's shared-memory allreduce op (used only by
tensor-parallel inference) is not built, so no /dev/shm buffer outlives a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

PROBE = '''
import json, os, sys
import torch
from matekd_ds import distributed

distributed.init()
total = torch.tensor([float(distributed.rank() + 1)])
torch.distributed.all_reduce(total)
pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
left = sorted(name for name in os.listdir("/dev/shm") if name.startswith(pattern)) if os.path.isdir("/dev/shm") else []
# one file per rank: two ranks printing to one pipe can land on one line
report = {"rank": distributed.rank(), "sum": float(total), "port": os.environ["MASTER_PORT"], "shm": left}
open(f"rank{distributed.rank()}.json", "w").write(json.dumps(report))
distributed.shutdown()
'''


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_two_cpu_ranks_reduce_without_a_shared_memory_buffer(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = run_cli([], tmp_path, ranks=2, script=script, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["sum"] == 3.0 for r in reports)  # 1 + 2: the gloo group works
    assert all(r["shm"] == [] for r in reports)
    port = reports[0]["port"]
    assert not [p for p in Path("/dev/shm").iterdir() if f"_{port}_" in p.name and "deepspeed" in p.name]
