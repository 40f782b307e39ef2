"""Process-group setup and the few collectives the trainer needs (rank, barrier, gather)."""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from matekd_ds import peers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    """Join the launcher's process group; a plain `matekd train` becomes a world of one."""
    if dist.is_available() and dist.is_initialized():
        return
    alone = "RANK" not in os.environ  # not started by deepspeed/torchrun/srun wrapper
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="0")  # no port is used: _form_world_of_one
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _skip_cpu_shared_memory_op()
    backend = accelerator.communication_backend_name()
    if alone:
        _form_world_of_one(backend)  # deepspeed.init_distributed adopts the group that exists
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout())
    except dist.DistNetworkError as err:  # rank 0 could not listen on MASTER_PORT (in use, say)
        from matekd_ds.errors import RunFailed

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RunFailed(f"could not form the process group at {os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')} ({first[:200]}); start again with another port "
                        "(the launcher's --master_port, or MASTER_PORT)") from None
    peers.start()  # a heartbeat, so that a survivor of a lost node can name it (peers.py)


def _form_world_of_one(backend: str) -> None:
    """The process group of a lone process, on an in-memory store: no TCP port is chosen, so no
    other process can take it first (the default env:// rendezvous listens on MASTER_PORT, and
    sweeps start many single-rank runs on one host at once). Gloo's own socket takes a port the
    kernel assigns. Other backends (oneCCL) keep DeepSpeed's own rendezvous on a free port."""
    if backend not in ("gloo", "nccl"):
        os.environ["MASTER_PORT"] = str(_free_port())
        return
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=collective_timeout())


COLLECTIVE_TIMEOUT_ENV = "MATEKD_COLLECTIVE_TIMEOUT_S"


def collective_timeout() -> datetime.timedelta:
    """How long a collective (gloo and NCCL alike), the rendezvous and the TCP store wait for a
    peer before they fail: MATEKD_COLLECTIVE_TIMEOUT_S seconds, else DeepSpeed's own default
    (DEEPSPEED_TIMEOUT minutes, 10 unless set). It bounds how long the survivors of a lost node
    wait before they exit (a peer that dies outright closes its connections, which fails a
    collective at once); it must exceed the longest stretch one rank works while the others wait
    at a collective (rank 0 exporting a model, a slow first step)."""
    text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not text:
        from deepspeed.constants import default_pg_timeout
        return default_pg_timeout
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        from matekd_ds.errors import MatekdError
        raise MatekdError(f"{COLLECTIVE_TIMEOUT_ENV}={text}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


def _skip_cpu_shared_memory_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (about 50 s on a fresh
    machine, half an hour on a loaded one) whose only caller is tensor-parallel inference
    (`inference_all_reduce`, AutoTP layers): training and the ZeRO-3 teacher never use it. Built,
    it also leaves a 66 MiB /dev/shm buffer per rank behind after every run, killed or not
    (DeepSpeed never unlinks it: 18 GB of RAM after a day of multi-rank tests here). Not built."""
    import importlib

    try:  # `import deepspeed.comm.torch as m` would give torch itself: deepspeed.comm binds the name
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group before the interpreter exits. Ranks first meet at a barrier (none
    tears its connections down while a peer still works), unless wait_for_peers is False: on an
    error path a failed rank's peers may never arrive."""
    if not _initialized():
        return
    peers.stop()
    try:
        gloo = dist.get_backend() == "gloo"
        if wait_for_peers:
            barrier()
        dist.destroy_process_group()
    except Exception:  # the group is already broken; the process is leaving anyway
        return
    if gloo:
        _let_gloo_workers_let_go()


def _let_gloo_workers_let_go(seconds: float = 0.25) -> None:
    """A gloo worker thread drops its reference to a finished async collective (ZeRO-3's
    all-gathers) a moment after the caller sees it complete. If that reference is the last one,
    freeing the tensors needs the GIL; during interpreter shutdown the thread cannot take it and
    the process aborts ("terminate called without an active exception", exit -6: a core dump
    shows ~AsyncAllgatherWork in ProcessGroupGloo's worker). destroy_process_group does not join
    the workers while DeepSpeed still references the group, so give them the GIL for a moment
    instead. tests/zero3_load_probe.py on 2 CPU ranks aborted in 3 of 15 runs before, 1 of 16 with
    the barrier alone, 0 of 42 with this (12 of them with both cores saturated)."""
    time.sleep(seconds)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# Before init() these read the launcher's environment, so inputs can be checked (and rejected)
# before DeepSpeed is imported and the process group formed.
def rank() -> int:
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialized() and world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (gloo and NCCL alike)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: list) -> list[float]:
    """Each value (a number or a 0-d tensor) averaged over the ranks; one all-reduce for all."""
    local = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values]) if values else None
    if local is None or world_size() == 1:
        return [] if local is None else local.tolist()
    total = local.to(device() if dist.get_backend() == "nccl" else torch.device("cpu"))
    dist.all_reduce(total)
    return (total / world_size()).cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True when `flag` is set on any rank (used to stop every rank at the same step)."""
    if world_size() == 1:
        return flag
    return bool(max(gather_objects(bool(flag))))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", "0")))
