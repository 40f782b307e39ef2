"""SIGTERM and SIGINT, from start-up to exit: a stop request honoured at the next safe point.

A job scheduler preempting the run sends SIGTERM (a user, Ctrl-C). The first signal only sets a
flag: the training loop checkpoints at its next step boundary and exits; between phases the run
exits before starting the next one. Either way metrics.json says "interrupted" and `--resume`
continues. A second signal gives up at once (KeyboardInterrupt), unless it comes within
DUPLICATE_WINDOW_S of the first: that is the same stop delivered twice (Ctrl-C reaches the whole
process group, and `matekd experiment` passes it on to its job as well).
"""

from __future__ import annotations

import os
import signal
import time

from matekd_ds import distributed
from matekd_ds.callbacks import RunCallback, StepEnd

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect of a job that stopped on request
DUPLICATE_WINDOW_S = 2.0
_requested = False
_requested_at = 0.0
_installed = False


class StopRequested(Exception):
    """A stop signal arrived; whatever could be saved was saved, and the run can be resumed."""


def install() -> None:
    """Handle SIGTERM/SIGINT from now on (idempotent)."""
    global _installed
    if not _installed:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
        _installed = True


def _on_signal(signum, frame) -> None:
    global _requested, _requested_at
    if _requested:
        if time.monotonic() - _requested_at < DUPLICATE_WINDOW_S:
            return  # the first stop, delivered twice
        raise KeyboardInterrupt  # a second stop: give up at once
    _requested, _requested_at = True, time.monotonic()
    # Straight to stderr, not through logging: the handler may run in the middle of an import, and
    # logging's console handler imports (tqdm): a library half-imported then fails (RecursionError).
    os.write(2, f"[matekd] {signal.Signals(signum).name} received: stopping at the next safe point\n".encode())


def requested() -> bool:
    return _requested


def agreed(collective: bool = True) -> bool:
    """Whether any rank was asked to stop. `collective`: every rank calls it at the same point."""
    if collective and distributed.world_size() > 1:
        return distributed.any_rank(_requested)
    return _requested


CONTINUE = "continue with --resume"
# Nothing was written: --resume would find nothing to resume, and the command as it was given
# (with --resume when it resumed an earlier run, without it when it started one) is what works.
START_AGAIN = "run the same command again"


def stop_here(where: str, collective: bool = True, advice: str = CONTINUE) -> None:
    """Raise StopRequested if a stop was requested (on any rank)."""
    if agreed(collective):
        raise StopRequested(f"stopped {where}; {advice}")


# Where a stop at each pipeline boundary leaves the run. "loaded" comes before the process group
# exists, so each rank decides alone there (and has written nothing).
_AT_BOUNDARY = {"loaded": "before the run started (nothing was written)", "opened": "before the teacher phase",
                "teacher": "after the teacher phase", "warmup": "after the generator warm-up"}


class StopOnSignal(RunCallback):
    """The run's answer to SIGTERM/SIGINT: stop at the next boundary, or checkpoint and stop at
    the next step on which every rank can agree (every step on one rank, logging steps on more)."""

    def on_boundary(self, point: str) -> None:
        loaded = point == "loaded"
        stop_here(_AT_BOUNDARY[point], collective=not loaded, advice=START_AGAIN if loaded else CONTINUE)

    def on_step_end(self, event: StepEnd) -> bool:
        if distributed.world_size() == 1:
            return requested()
        return event.collective_ok and agreed()
