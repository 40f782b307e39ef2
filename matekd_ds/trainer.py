"""The training loop for one phase (teacher fine-tuning, the generator's MLM warm-up, or the
student's ft/kd/matekd run): batches in, method steps, periodic evaluation, logging and
checkpoints, resumable at any step. What else happens after a step (a stop request, the tests'
injected faults) comes through the run's callbacks (callbacks.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from matekd_ds import distributed, signals
from matekd_ds.callbacks import Callbacks, StepEnd
from matekd_ds.checkpoint import Checkpointer
from matekd_ds.config import RunConfig
from matekd_ds.data.batching import Encoded, TrainStream, collate, to_device
from matekd_ds.evaluation import main_score
from matekd_ds.health import Diverged, TrainingHealth
from matekd_ds.methods.base import Method
from matekd_ds.monitor import Monitor, log

# Each phase draws its own masks and noise (the student phase's offset is 7_919); so does the
# adversary probe's fixed set (adversary.py), apart from every training step's.
PHASE_SEED_OFFSETS = {"teacher": 0, "student": 7_919, "generator_warmup": 104_723, "adversary_probe": 224_737}


# Seeds are a pure function of (seed, phase, step, micro-batch, rank), so a resumed run draws the
# same masks, Gumbel noise and dropout as an uninterrupted one (and the benchmarks, which step a
# method outside this loop, draw what a run draws).

def _phase_base(seed: int, phase: str) -> int:
    return seed * 1_000_003 + PHASE_SEED_OFFSETS.get(phase, 7_919)


def micro_seeds(seed: int, phase: str, step: int, rank: int, grad_accum: int) -> list[int]:
    """One seed per micro-batch of `step`, for its masks and noise."""
    base = _phase_base(seed, phase) % (1 << 31)
    return [(base * 31 + step * 104_729 + micro * 1_299_709 + rank * 15_485_863) % (1 << 62)
            for micro in range(grad_accum)]


def seed_phase(seed: int, phase: str, rank: int) -> None:
    """Dropout and every other draw of a phase start from (seed, phase, rank) alone, so a phase
    runs the same whether earlier phases ran in this process or were resumed."""
    phase_seed = (_phase_base(seed, phase) + rank * 15_485_863) % (1 << 31)
    torch.manual_seed(phase_seed)
    np.random.seed(phase_seed)
    random.seed(phase_seed)


@dataclass
class LoopConfig:
    phase: str  # "teacher", "generator_warmup" or "student": names the logged scalars and evaluations
    total_steps: int
    micro_batch: int
    grad_accum: int
    seed: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    progress: bool
    # Checkpoint before the first step, so that a crash at any later moment resumes this phase
    # from a checkpoint rather than rebuilding it (the student phase).
    checkpoint_at_start: bool = False
    allow_overflow_skips: bool = False  # fp16: DeepSpeed's loss scaler may skip steps
    max_overflow_skips: int = 50
    group_by_length: bool = False  # data.group_by_length: batches of similar token counts

    @classmethod
    def of_run(cls, cfg: RunConfig, phase: str, total_steps: int, dtype: str) -> LoopConfig:
        return cls(
            phase=phase, total_steps=total_steps, micro_batch=cfg.train.micro_batch_size,
            grad_accum=cfg.train.gradient_accumulation_steps, seed=cfg.train.seed,
            eval_every=cfg.eval.every_steps, checkpoint_every=cfg.output.checkpoint_every,
            log_every=cfg.logging.log_every, progress=cfg.logging.progress,
            checkpoint_at_start=phase == "student", allow_overflow_skips=dtype == "fp16",
            max_overflow_skips=cfg.train.max_overflow_skips, group_by_length=cfg.data.group_by_length,
        )


@dataclass
class LoopState:
    step: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    train_seconds: float = 0.0
    samples: int = 0
    tokens: int = 0


class Evaluator(Protocol):
    """Scores the model a loop trains: {split: {metric: value, ..., "main": value}}."""

    metric_name: str

    def __call__(self) -> dict[str, dict[str, float]]: ...


class Trainer:
    """Drives a `Method` over the training set for `loop.total_steps` steps. `on_best` runs
    after an evaluation that improved the main score (the student phase exports student_best)."""

    def __init__(self, method: Method, train: Encoded, pad_id: int, device: torch.device, loop: LoopConfig,
                 evaluator: Evaluator, checkpointer: Checkpointer, monitor: Monitor, callbacks: Callbacks,
                 on_best: Callable[[], None] | None = None):
        self.method, self.evaluator = method, evaluator
        self.train_data, self.pad_id, self.device = train, pad_id, device
        self.loop, self.checkpointer, self.monitor, self.on_best = loop, checkpointer, monitor, on_best
        self.callbacks = callbacks
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.stream = TrainStream.over(train, loop.micro_batch, self.rank, self.world, loop.seed,
                                       group_by_length=loop.group_by_length)
        self.state = LoopState()
        self.health = TrainingHealth(loop.allow_overflow_skips, loop.max_overflow_skips)

    def fit(self, resume: bool) -> LoopState:
        """Train to `loop.total_steps`; with `resume`, from this phase's newest verified
        checkpoint (if it has one). Raises Diverged, StopRequested or the error that ended it."""
        signals.install()
        seed_phase(self.loop.seed, self.loop.phase, self.rank)
        restored = self._restore() if resume else False
        if self.loop.checkpoint_at_start and not restored and self.state.step == 0:
            self.save()
        batches = self.stream.batches(start=self.state.step * self.loop.grad_accum)
        bar = tqdm(total=self.loop.total_steps, initial=self.state.step, desc=self.loop.phase,
                   disable=not (self.loop.progress and distributed.is_main()), dynamic_ncols=True)
        try:
            self._run(batches, bar)
        except Diverged as err:
            tag = self.checkpointer.latest_tag()  # saves check first: the newest is the last finite one
            where = self.checkpointer.folder(tag) if tag else "none (it diverged before the first one)"
            raise Diverged(err.step, f"{err}; the last finite checkpoint: {where}") from None
        finally:
            bar.close()
        return self.state

    def _run(self, batches: Iterator[list[int]], bar) -> None:
        window: dict[str, list] = {}  # scalar name -> [sum, count]
        while self.state.step < self.loop.total_steps:
            trained, losses = self._train_step(batches)
            self._add_to_window(window, self._log_prefix(trained), losses)
            bar.update(1)
            if self._due(self.loop.log_every):
                self._log_window(window, bar)
                window = {}
            if self._due(self.loop.eval_every):
                self.run_evaluation()
            if self._due(self.loop.checkpoint_every):
                self.save()
            event = StepEnd(self.loop.phase, self.state.step, trained, losses, self.method.engines,
                            collective_ok=self.state.step % self.loop.log_every == 0)
            if self.callbacks.step_end(event):
                self.save()
                raise signals.StopRequested(f"stopped at step {self.state.step} of the {self.loop.phase} phase; "
                                            "continue with --resume")

    def _train_step(self, batches: Iterator[list[int]]) -> tuple[str, dict[str, torch.Tensor]]:
        """One step of the method on the next micro-batches; returns the role it trained and
        its losses (still on the device: nothing here waits for them)."""
        step = self.state.step
        started = time.perf_counter()
        cpu_batches = [collate(self.train_data, next(batches), self.pad_id) for _ in range(self.loop.grad_accum)]
        micro = [to_device(b, self.device) for b in cpu_batches]
        losses = self.method.train_step(micro, step, micro_seeds(self.loop.seed, self.loop.phase, step, self.rank,
                                                                 self.loop.grad_accum))
        self.state.step += 1
        self.state.train_seconds += time.perf_counter() - started
        self.state.samples += sum(len(b["input_ids"]) for b in cpu_batches) * self.world
        self.state.tokens += int(sum(b["attention_mask"].sum() for b in cpu_batches)) * self.world
        trained = self.method.trains(step)
        self.health.after_step(step + 1, self._log_prefix(trained), losses, self.method.engines)
        return trained, losses

    def _due(self, every: int) -> bool:
        """Whether something done every `every` steps (0: only at the end) is due now."""
        return (every and self.state.step % every == 0) or self.state.step == self.loop.total_steps

    def _log_prefix(self, trained: str) -> str:
        """Losses are logged under the phase ("student/loss"), or, for a method that trains
        several engines (MATE-KD), under the engine the step trained ("generator/gen_div")."""
        return trained if len(self.method.engines) > 1 else self.loop.phase

    @staticmethod
    def _add_to_window(window: dict[str, list], prefix: str, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            entry = window.setdefault(f"{prefix}/{key}", [0.0, 0])
            entry[0], entry[1] = entry[0] + value, entry[1] + 1

    def _agree_on_health(self, check) -> None:
        """Run a health check on every rank and raise the same Diverged everywhere."""
        try:
            check()
            problem = None
        except Diverged as err:
            problem = (err.step, str(err))
        problems = sorted(p for p in distributed.gather_objects(problem) if p)
        if problems:
            raise Diverged(*problems[0])

    def _log_window(self, window: dict[str, list], bar) -> None:
        # .item() happens here, once per window, not once per step. Several ranks: the mean over
        # ranks, i.e. the loss of the global batch (every rank logs at the same steps).
        self._agree_on_health(self.health.check)
        names = sorted(window)
        means = distributed.mean_over_ranks([window[name][0] for name in names])
        scalars = {name: total / window[name][1] for name, total in zip(names, means)}
        scalars[f"{self.loop.phase}/lr"] = self._lr()
        scalars[f"{self.loop.phase}/samples_per_s"] = self.state.samples / max(self.state.train_seconds, 1e-9)
        self.monitor.write(self.state.step, scalars)
        shown = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in scalars.items() if k.endswith(("loss", "gen_div"))}
        bar.set_postfix(shown, refresh=False)

    def _lr(self) -> float:
        engine = next(iter(self.method.engines.values()))  # the student's, when there is one
        return float(engine.get_lr()[0])

    def run_evaluation(self) -> dict[str, Any]:
        results = self.evaluator()
        for engine in self.method.engines.values():
            # ZeRO-3 keeps weights gathered after forward-only passes when its recorded trace
            # expects a backward next; free them (no-op below stage 3)
            engine.empty_partition_cache()
        record = {"step": self.state.step, "phase": self.loop.phase, "dev": results}
        self.state.evaluations.append(record)
        score = main_score(results)
        improved = self.state.best is None or score > main_score(self.state.best["dev"])
        if improved:
            self.state.best = record
            if self.on_best is not None:
                self._check_finite()  # an export never holds NaN or inf
                self.on_best()
        flat = {f"{self.loop.phase}_eval/{split}_{name}": value
                for split, metrics in results.items() for name, value in metrics.items()}
        self.monitor.write(self.state.step, flat)
        summary = ", ".join(f"{split} {self.evaluator.metric_name} {m['main']:.4f}" for split, m in results.items())
        log.info(f"[{self.loop.phase}] step {self.state.step}/{self.loop.total_steps}: "
                 f"{summary}{' (best)' if improved else ''}")
        return record

    def _check_finite(self) -> None:
        """Losses and gradients since the last check, and every parameter, are finite."""
        self._agree_on_health(self.health.check)
        self._agree_on_health(lambda: self.health.check_parameters(self.state.step, self.method.engines))

    def save(self) -> None:
        """Checkpoint, unless training has diverged: the last checkpoint stays the last finite one."""
        self._check_finite()
        self.checkpointer.save(self.method.engines, self.state.step, self._state_dict())

    def _state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.state.step, "evaluations": self.state.evaluations, "best": self.state.best,
            "train_seconds": self.state.train_seconds, "samples": self.state.samples, "tokens": self.state.tokens,
            "world_size": self.world, "grad_accum": self.loop.grad_accum, "micro_batch": self.loop.micro_batch,
        }
        extra = self.method.state_dict() if hasattr(self.method, "state_dict") else None
        if extra:  # what a method keeps outside its engines (MATE-KD's adversary probe)
            state["method"] = extra
        return state

    def _restore(self) -> bool:
        saved = self.checkpointer.load(self.method.engines)
        if saved is None:
            log.info(f"[{self.loop.phase}] no checkpoint of this phase yet: starting it from the beginning")
            return False
        if saved["micro_batch"] * saved["world_size"] != self.loop.micro_batch * self.world:
            log.warning("resuming with a different global micro-batch: the data position is approximate")
        self.state = LoopState(
            step=saved["step"], evaluations=saved["evaluations"], best=saved["best"],
            train_seconds=saved["train_seconds"], samples=saved["samples"], tokens=saved["tokens"],
        )
        if hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(saved.get("method") or {})
        log.info(f"[{self.loop.phase}] resumed at step {self.state.step}")
        return True
