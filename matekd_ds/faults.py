"""Fault injection for the recovery tests: crashes, signals and non-finite values at chosen
moments of a run. A run callback (callbacks.py) that `matekd train` installs only when one of
these environment variables is set (never a config key):

    MATEKD_CRASH_AFTER_STEP=N[:PHASE] raise after step N of a training phase (of PHASE only)
    MATEKD_FAULT_AT=POINT:ACTION     at a boundary of the pipeline (POINT: loaded, opened,
                                     teacher, warmup), ACTION: crash | sigterm | sigkill |
                                     fill-disk (fill the filesystem of the working directory,
                                     which must be a small one: a full disk mid-run)
    MATEKD_NAN_AFTER_STEP=N[:PHASE]  after step N (of PHASE, default student), a NaN in a
                                     parameter of the engine that step trained
    MATEKD_HOLD_AFTER_STEP=N[:PHASE] after step N, stop working for MATEKD_HOLD_SECONDS (600) on
                                     the ranks in MATEKD_HOLD_RANKS (e.g. "1,3"; default: all),
                                     saying so on stderr: a moment at which a test can take a
                                     node away while its peers wait for it at a collective
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping

import torch

from matekd_ds.callbacks import BOUNDARIES, RunCallback, StepEnd
from matekd_ds.errors import MatekdError

CRASH_AFTER_STEP = "MATEKD_CRASH_AFTER_STEP"
FAULT_AT = "MATEKD_FAULT_AT"
NAN_AFTER_STEP = "MATEKD_NAN_AFTER_STEP"
HOLD_AFTER_STEP, HOLD_RANKS, HOLD_SECONDS = "MATEKD_HOLD_AFTER_STEP", "MATEKD_HOLD_RANKS", "MATEKD_HOLD_SECONDS"
ACTIONS = ("crash", "sigterm", "sigkill", "fill-disk")
FILL_DISK_MAX_FREE = 1 << 30  # fill-disk refuses a filesystem with more free space: meant for a test's tmpfs


def _step_and_phase(spec: str, variable: str, default_phase: str | None) -> tuple[int, str | None]:
    step, _, phase = spec.partition(":")
    if not step.isdigit():
        raise MatekdError(f"{variable}={spec}: expected STEP[:PHASE]")
    return int(step), phase or default_phase


def _hold(env: Mapping[str, str]) -> tuple[int, str | None] | None:
    """MATEKD_HOLD_AFTER_STEP, if this rank (RANK) is one of MATEKD_HOLD_RANKS."""
    if not env.get(HOLD_AFTER_STEP):
        return None
    wanted = _step_and_phase(env[HOLD_AFTER_STEP], HOLD_AFTER_STEP, None)
    ranks = [r.strip() for r in env.get(HOLD_RANKS, "").split(",") if r.strip()]
    return wanted if not ranks or env.get("RANK", "0") in ranks else None


class FaultInjection(RunCallback):
    def __init__(self, crash_after: tuple[int, str | None] | None = None, fault_at: tuple[str, str] | None = None,
                 nan_after: tuple[int, str | None] | None = None, hold_after: tuple[int, str | None] | None = None,
                 hold_seconds: float = 600.0):
        self.crash_after, self.fault_at, self.nan_after = crash_after, fault_at, nan_after
        self.hold_after, self.hold_seconds = hold_after, hold_seconds

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> FaultInjection | None:
        """The faults the environment asks for, or None when it asks for none."""
        crash = _step_and_phase(env[CRASH_AFTER_STEP], CRASH_AFTER_STEP, None) if env.get(CRASH_AFTER_STEP) else None
        nan = _step_and_phase(env[NAN_AFTER_STEP], NAN_AFTER_STEP, "student") if env.get(NAN_AFTER_STEP) else None
        fault_at = None
        if env.get(FAULT_AT):
            point, _, action = env[FAULT_AT].partition(":")
            if point not in BOUNDARIES or action not in ACTIONS:
                raise MatekdError(f"{FAULT_AT}={env[FAULT_AT]}: expected POINT:ACTION with POINT one of "
                                 f"{', '.join(BOUNDARIES)} and ACTION one of {', '.join(ACTIONS)}")
            fault_at = (point, action)
        hold = _hold(env)
        if crash is None and nan is None and fault_at is None and hold is None:
            return None
        return cls(crash, fault_at, nan, hold, float(env.get(HOLD_SECONDS) or 600.0))

    def on_boundary(self, point: str) -> None:
        if self.fault_at is None or self.fault_at[0] != point:
            return
        action = self.fault_at[1]
        if action == "crash":
            raise RuntimeError(f"{FAULT_AT}={point}:{action}: simulated crash")
        if action == "fill-disk":
            _fill_filesystem(os.getcwd())
            return
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGKILL)

    def on_step_end(self, event: StepEnd) -> bool:
        if _matches(self.nan_after, event):
            _poison(event.engines.get(event.trained) or next(iter(event.engines.values())))
        if _matches(self.crash_after, event):
            raise RuntimeError(f"{CRASH_AFTER_STEP}={self.crash_after[0]}: simulated crash in the {event.phase} phase")
        if _matches(self.hold_after, event):
            print(f"matekd: rank {os.environ.get('RANK', '0')} holding for {self.hold_seconds:g}s after step "
                  f"{event.step} of the {event.phase} phase", file=sys.stderr, flush=True)
            time.sleep(self.hold_seconds)
        return False


def _fill_filesystem(folder: str) -> None:
    """Write zeros into a hidden file in `folder` until its filesystem has no byte left."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    if free > FILL_DISK_MAX_FREE:
        raise MatekdError(f"{FAULT_AT}=...:fill-disk: {folder} has {free >> 20} MiB free; run it on a small filesystem")
    with open(os.path.join(folder, ".matekd-fill"), "ab", buffering=0) as filler:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    filler.write(b"\0" * chunk)
            except OSError:
                continue  # full at this granularity: the rest in smaller pieces


def _matches(wanted: tuple[int, str | None] | None, event: StepEnd) -> bool:
    return wanted is not None and wanted[0] == event.step and wanted[1] in (None, event.phase)


def _poison(engine) -> None:
    """A NaN in the first parameter (its partition, under ZeRO-3) of `engine`."""
    with torch.no_grad():
        param = next(p for p in engine.module.parameters())
        held = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
        held.view(-1)[0] = float("nan")
