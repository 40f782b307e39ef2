"""Fault injection for the recovery tests: crashes, signals and non-finite values at chosen
moments of a run, switched on by environment variables only (never by a config key).

    MATEKD_CRASH_AFTER_STEP=N[:PHASE] raise after step N of a training phase (of PHASE only)
    MATEKD_FAULT_AT=POINT:ACTION     at a phase boundary of the pipeline (POINT: loaded, opened,
                                     teacher, warmup), ACTION: crash | sigterm | sigkill
    MATEKD_NAN_AFTER_STEP=N[:PHASE]  after step N (of PHASE, default student), a NaN in a
                                     parameter of the engine that step trained
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

CRASH_AFTER_STEP = "MATEKD_CRASH_AFTER_STEP"
FAULT_AT = "MATEKD_FAULT_AT"
NAN_AFTER_STEP = "MATEKD_NAN_AFTER_STEP"


def crash_after_step(phase: str, step: int) -> None:
    wanted, _, wanted_phase = os.environ.get(CRASH_AFTER_STEP, "0").partition(":")
    if int(wanted) and step == int(wanted) and wanted_phase in ("", phase):
        raise RuntimeError(f"{CRASH_AFTER_STEP}={wanted}: simulated crash in the {phase} phase")


def at(point: str) -> None:
    spec = os.environ.get(FAULT_AT, "")
    where, _, action = spec.partition(":")
    if where != point:
        return
    if action == "crash":
        raise RuntimeError(f"{FAULT_AT}={spec}: simulated crash")
    if action in ("sigterm", "sigkill"):
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGKILL)


def poison_after_step(phase: str, step: int, engines: dict[str, Any], trained: str) -> None:
    spec = os.environ.get(NAN_AFTER_STEP, "")
    if not spec:
        return
    wanted, _, wanted_phase = spec.partition(":")
    if int(wanted) != step or (wanted_phase or "student") != phase:
        return
    engine = engines.get(trained) or next(iter(engines.values()))
    with torch.no_grad():
        param = next(p for p in engine.module.parameters())
        held = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
        held.view(-1)[0] = float("nan")
