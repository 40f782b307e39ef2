"""launch/: each wrapper's --dry-run prints the command it would run, resolved from the
environment, and bad settings stop it with one line. (tests/test_scale.py runs deepspeed.sh and
torchrun.sh for real on 2 CPU ranks.)"""

from __future__ import annotations

import shlex

import pytest
from helpers import run_launcher


def dry_run(script: str, env: dict, args=("train", "--config", "run.yaml")) -> list[str]:
    result = run_launcher(script, ["--dry-run", *args], cwd=".", env=env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip())


def test_deepspeed_one_node():
    cmd = dry_run("deepspeed.sh", {"NUM_GPUS": "4", "MASTER_PORT": "29611"})
    assert cmd == ["deepspeed", "--master_port", "29611", "--num_gpus", "4", "--module", "matekd_ds",
                   "train", "--config", "run.yaml"]


def test_deepspeed_several_nodes_through_a_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    cmd = dry_run("deepspeed.sh", {"NUM_GPUS": "8", "HOSTFILE": str(hostfile), "NUM_NODES": "2",
                                   "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"})
    assert cmd[:11] == ["deepspeed", "--master_port", "29500", "--num_gpus", "8", "--hostfile", str(hostfile),
                        "--num_nodes", "2", "--master_addr", "node-a"]
    assert cmd[11:] == ["--module", "matekd_ds", "train", "--config", "run.yaml"]


def test_torchrun_node_of_several():
    cmd = dry_run("torchrun.sh", {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-a",
                                  "MASTER_PORT": "29500"}, args=("train", "train.lr=3e-5"))
    assert cmd == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--master_addr",
                   "node-a", "--master_port", "29500", "-m", "matekd_ds", "train", "train.lr=3e-5"]


def test_slurm_resolves_the_first_node_and_gpus_per_node():
    cmd = dry_run("slurm.sbatch", {"GPUS_PER_NODE": "4", "SLURM_NNODES": "3", "SLURM_JOB_ID": "77",
                                   "SLURM_JOB_NODELIST": "", "MASTER_ADDR": "login-1", "MASTER_PORT": "29500",
                                   "MATEKD_PYTHON": "/venv/bin/python"})
    assert cmd[:6] == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert cmd[6:] == ["/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "3", "--nproc_per_node", "4",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", "login-1:29500", "--rdzv_id", "77",
                       "-m", "matekd_ds", "train", "--config", "run.yaml"]


@pytest.mark.parametrize("script, env, fragment", [
    ("deepspeed.sh", {"NUM_GPUS": "two"}, "NUM_GPUS must be a positive integer"),
    ("deepspeed.sh", {"NUM_GPUS": "2", "HOSTFILE": "/no/such/hostfile"}, "HOSTFILE /no/such/hostfile not found"),
    ("torchrun.sh", {"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK must be in 0..1"),
])
def test_bad_settings_stop_with_one_line(script, env, fragment):
    result = run_launcher(script, ["--dry-run", "train"], cwd=".", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr
