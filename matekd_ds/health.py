"""Non-finite training is stopped, not exported.

Per step, without a host sync: each loss (and a gradient norm that is still on the device) is
folded into a device-side "first step where it was not finite" marker; DeepSpeed's count of
skipped steps (a host integer) is compared with the previous step's. The markers are read at
logging steps, and every parameter is checked before each checkpoint and export, so a diverged
run stops with its last finite checkpoint intact and never exports NaN or inf weights.

In fp16, DeepSpeed skips the step when the scaled gradients overflow and lowers the loss scale:
that is normal, up to `max_overflow_skips` skips in a row. In bf16 and fp32 there is no loss
scale, so a skipped step means the gradient itself was not finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class Diverged(Exception):
    """Training produced a non-finite loss, gradient or parameter."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(message)

    @classmethod
    def at(cls, step: int, what: str, value: str = "not finite") -> Diverged:
        return cls(step, f"training diverged at step {step}: {what} is {value}")


def _first_bad(marker: torch.Tensor | None, value: torch.Tensor, step: int) -> torch.Tensor:
    """`marker` (-1 while all values were finite) updated with `value` seen at `step`."""
    bad = ~torch.isfinite(value.detach().float()).all()
    step_t = torch.full((), step, dtype=torch.long, device=value.device)
    if marker is None:
        marker = torch.full((), -1, dtype=torch.long, device=value.device)
    return torch.where((marker < 0) & bad, step_t, marker)


def finite_parameters(module: torch.nn.Module) -> str | None:
    """The name of the first parameter (or ZeRO-3 partition) holding a NaN or inf, or None."""
    names, flags = [], []
    for name, p in module.named_parameters():
        held = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if held is not None and held.numel():
            names.append(name)
            flags.append(torch.isfinite(held).all())
    if not flags:
        return None
    ok = torch.stack(flags).cpu().tolist()  # one sync for the whole model
    return next((name for name, good in zip(names, ok) if not good), None)


class TrainingHealth:
    def __init__(self, allow_overflow_skips: bool, max_overflow_skips: int):
        self.allow_overflow_skips = allow_overflow_skips  # fp16: DeepSpeed's loss scaler skips steps
        self.max_overflow_skips = max_overflow_skips
        self.markers: dict[str, torch.Tensor] = {}
        self.skipped: dict[str, int] = {}
        self.skips_in_a_row: dict[str, int] = {}

    def after_step(self, step: int, prefix: str, losses: dict[str, torch.Tensor], engines: dict[str, Any]) -> None:
        """Called after every step; raises Diverged only on host-side evidence (no sync)."""
        for key, value in losses.items():
            if torch.is_tensor(value):
                self.markers[f"{prefix} {key}"] = _first_bad(self.markers.get(f"{prefix} {key}"), value, step)
        for name, engine in engines.items():
            self._check_engine(step, name, engine)

    def _check_engine(self, step: int, name: str, engine: Any) -> None:
        norm = getattr(engine, "get_global_grad_norm", lambda: None)()
        if torch.is_tensor(norm):
            self.markers[f"{name} gradient norm"] = _first_bad(self.markers.get(f"{name} gradient norm"), norm, step)
        elif isinstance(norm, float) and not math.isfinite(norm) and not self.allow_overflow_skips:
            raise Diverged.at(step, f"the {name} gradient norm", str(norm))
        skipped = int(getattr(engine, "skipped_steps", 0))
        previous = self.skipped.get(name, skipped)
        self.skipped[name] = skipped
        if skipped == previous:
            self.skips_in_a_row[name] = 0
            return
        self.skips_in_a_row[name] = self.skips_in_a_row.get(name, 0) + 1
        if not self.allow_overflow_skips:
            raise Diverged.at(step, f"the {name} gradient (DeepSpeed skipped the step)")
        if self.skips_in_a_row[name] > self.max_overflow_skips:
            raise Diverged.at(step, f"the {name} gradient ({self.skips_in_a_row[name]} fp16 overflow skips in a "
                                    f"row, train.max_overflow_skips={self.max_overflow_skips})")

    def check(self) -> None:
        """Raise Diverged naming the earliest non-finite value since the last check (one sync)."""
        if not self.markers:
            return
        names = list(self.markers)
        devices = {m.device for m in self.markers.values()}
        markers = [self.markers[n] if len(devices) == 1 else self.markers[n].cpu() for n in names]
        steps = torch.stack(markers).cpu().tolist()
        bad = [(s, n) for s, n in zip(steps, names) if s >= 0]
        if bad:
            step, what = min(bad)
            raise Diverged.at(step, f"the {what}")

    def check_parameters(self, step: int, engines: dict[str, Any]) -> None:
        """Before a checkpoint or an export: every parameter of every engine is finite."""
        for name, engine in engines.items():
            bad = finite_parameters(engine.module)
            if bad is not None:
                raise Diverged.at(step, f"the {name} parameter {bad}")
