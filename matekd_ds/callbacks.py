"""What a run does besides training, kept out of the story: hooks at the pipeline's boundaries
and after every training step, in the spirit of Hugging Face's TrainerCallback.

    pipeline.run_training   calls `boundary(point)` between its steps: "loaded" (inputs read,
                            nothing written, no process group yet), "opened" (run directory
                            ready), "teacher" (teacher phase done), "warmup" (generator warm-up done)
    Trainer (trainer.py)    calls `step_end(event)` after each step's logging, evaluation and
                            checkpoint; a callback that answers True makes the loop checkpoint
                            and stop

A callback may also raise (a simulated crash, a stop request). Installed: signals.StopOnSignal
by every run; faults.FaultInjection by `matekd train` when a MATEKD_* fault variable is set (the
recovery tests); anything a test passes to `run_training(callbacks=...)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

BOUNDARIES = ("loaded", "opened", "teacher", "warmup")


@dataclass(frozen=True)
class StepEnd:
    phase: str  # the pipeline phase: "teacher", "generator_warmup" or "student"
    step: int  # steps done in this phase
    trained: str  # the role of the engine the step trained
    losses: dict[str, Any]  # the step's losses (0-d tensors)
    engines: dict[str, Any]  # the method's engines, by role
    collective_ok: bool  # every rank makes this call at this step (a logging step): collectives are safe


class RunCallback:
    """Override what you need; every hook does nothing by default."""

    def on_boundary(self, point: str) -> None:
        pass

    def on_step_end(self, event: StepEnd) -> bool:
        """True: checkpoint and stop the run here."""
        return False


class Callbacks:
    """The run's callbacks, called in order."""

    def __init__(self, callbacks: Iterable[RunCallback] = ()):
        self.callbacks = list(callbacks)

    def boundary(self, point: str) -> None:
        if point not in BOUNDARIES:
            raise ValueError(f"unknown boundary {point!r} (known: {', '.join(BOUNDARIES)})")
        for callback in self.callbacks:
            callback.on_boundary(point)

    def step_end(self, event: StepEnd) -> bool:
        stop = False
        for callback in self.callbacks:
            stop = callback.on_step_end(event) or stop
        return stop
