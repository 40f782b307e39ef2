"""Which peer a failed collective lost, said in one line.

When a node dies, its peers' next collective fails: at once if its processes died (the kernel
closes their connections: gloo says "Connection closed by peer [address]"), or after the
collective timeout (distributed.collective_timeout) if the node is cut off (gloo says only "Timed
out waiting ..."). Neither names the rank, so every rank of a multi-rank world beats a counter in
the run's TCP store (on rank 0's node) once a second from a background thread, and records its
host there. After a failed collective a survivor watches the counters for JUDGE_S: a rank whose
counter stands still is gone (dead, or cut off from the store); a rank stuck in a collective still
beats. If the store itself cannot be reached, rank 0's node is the one that is gone or cut off.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import threading
import time

import torch.distributed as dist

BEAT_S = 1.0  # how often each rank beats
JUDGE_S = 4.0  # how long a survivor watches: a live rank beats at least twice in it
STORE_TIMEOUT_S = 5.0  # a store call that takes longer means the store is out of reach
_PREFIX = "matekd/peers"
_heartbeat: _Heartbeat | None = None


class _Heartbeat(threading.Thread):
    def __init__(self, store, rank: int):
        super().__init__(name="matekd-heartbeat", daemon=True)
        self.store, self.rank, self.stopped = store, rank, threading.Event()

    def run(self) -> None:
        try:
            self.store.set(_host_key(self.rank), socket.gethostname())
        except Exception:  # best effort: the line then names the rank alone
            pass
        while not self.stopped.wait(BEAT_S):
            try:
                self.store.add(_beat_key(self.rank), 1)
            except Exception:  # the store is out of reach: keep trying until stopped
                continue


def _beat_key(rank: int) -> str:
    return f"{_PREFIX}/beat/{rank}"


def _host_key(rank: int) -> str:
    return f"{_PREFIX}/host/{rank}"


def _store_client():
    """A connection of its own to the process group's store (a store object is not to be shared
    between threads), with a short timeout; None when there is no such store."""
    try:
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
        return store
    except Exception:  # a store that cannot be cloned (not TCP): no heartbeat
        return None


def start() -> None:
    """Start this rank's heartbeat (once the process group exists; nothing in a world of one)."""
    global _heartbeat
    if _heartbeat is not None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    store = _store_client()
    if store is not None:
        _heartbeat = _Heartbeat(store, dist.get_rank())
        _heartbeat.start()


def stop() -> None:
    """Stop beating (before the process group goes away)."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stopped.set()
        _heartbeat.join(timeout=0.5)
        _heartbeat = None


def is_collective_failure(err: BaseException) -> bool:
    """An error from the communication backend (a peer gone, a collective timed out)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in ("gloo", "Gloo", "NCCL"))


def silent_ranks() -> tuple[list[int], dict[int, str]] | None:
    """The ranks whose heartbeat stood still for JUDGE_S, and the hosts the store knows for
    them; None when the store is out of reach (or this rank never started beating)."""
    if _heartbeat is None:
        return None
    store, world, me = _store_client(), dist.get_world_size(), dist.get_rank()
    if store is None:
        return None
    try:
        before = [store.add(_beat_key(rank), 0) for rank in range(world)]
        time.sleep(JUDGE_S)
        after = [store.add(_beat_key(rank), 0) for rank in range(world)]
        silent = [rank for rank in range(world) if rank != me and after[rank] == before[rank]]
        hosts = {rank: store.get(_host_key(rank)).decode() for rank in silent if store.check([_host_key(rank)])}
    except Exception:  # the store went away while we watched
        return None
    return silent, hosts


def _backend_says(err: BaseException) -> str:
    """The backend's message without its source location and advice: "[.../pair.cc:553]
    Connection closed by peer [10.0.0.2]:29326. This is typically ..." -> its first sentence."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return re.split(r"\. (?=[A-Z])", text, maxsplit=1)[0].rstrip(".")[:200]


def _ranks_on_hosts(silent: list[int], hosts: dict[int, str]) -> str:
    by_host: dict[str, list[int]] = {}
    for rank in silent:
        by_host.setdefault(hosts.get(rank, "an unknown host"), []).append(rank)
    return ", ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on {host}"
                     for host, ranks in by_host.items())


def lost_peer_line(err: BaseException) -> str:
    """One line for a failed collective: which rank(s) and host(s) were lost, what the backend
    said, what to do next. Takes JUDGE_S to watch the heartbeats."""
    said = _backend_says(err)
    verdict = silent_ranks()
    advice = "the checkpoints stay: rerun the same command with --resume once every node is back"
    if verdict is None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"lost rank 0's node (its store at {where} is out of reach): a collective failed ({said}); "
                f"{advice}")
    silent, hosts = verdict
    if not silent:
        from matekd_ds.distributed import collective_timeout

        return (f"a collective failed ({said}) though every rank still answers: one is stuck, or worked alone "
                f"longer than the collective timeout ({collective_timeout().total_seconds():g}s, "
                f"MATEKD_COLLECTIVE_TIMEOUT_S); {advice}")
    return f"lost {_ranks_on_hosts(silent, hosts)}: a collective failed ({said}); {advice}"
