"""Running the planned runs, each its own process, in order: finished ones skipped, a stop signal
passed on to the running job, progress and an ETA on the console."""

from __future__ import annotations

import shlex
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from matekd_ds.experiment.plan import Run
from matekd_ds.experiment.report import duration, first_split
from matekd_ds.run_dir import RunDir

# Lines of a run's output worth echoing while it runs: evaluations, phase starts, errors.
ECHO_MARKERS = ("] step ", "fine-tuning for", "warm-up for", "] matekd for", "] kd for", "] ft for",
                "error", "Error", "Traceback")


def _command(run: Run, config_path: Path, launcher: str | None) -> list[str]:
    prefix = shlex.split(launcher) + ["--module", "matekd_ds"] if launcher else [sys.executable, "-m", "matekd_ds"]
    args = [run.command, "--config", str(config_path)]
    if RunDir(run.run_dir).config_file.is_file():
        args.append("--resume")  # started before: continue from its checkpoint
    return prefix + args


class SweepStopped(Exception):
    """A stop signal reached the runner; the job it was running saved what it could and stopped."""

    def __init__(self, signum: int, label: str):
        super().__init__(f"stopped during {label}; rerun the same command to resume")
        self.exit_code = 128 + signum


class _Job:
    """The job's process once it is started, and the stop signals the runner received for it."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.received: list[int] = []

    def pass_on(self, signum, frame) -> None:
        self.received.append(signum)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def started(self, process: subprocess.Popen) -> None:
        """A stop that came while the job was being forked reaches it now."""
        self.process = process
        for signum in self.received:
            if process.poll() is None:
                process.send_signal(signum)


@contextmanager
def _stops_passed_on():
    """While a job runs, SIGTERM or SIGINT to the runner (kill, a scheduler, Ctrl-C) goes on to
    the job, which checkpoints at its next safe point and exits; the runner keeps logging until it
    has, then stops the sweep. The handlers go in before the job is forked, so no stop falls
    between the two. Yields the _Job to hand the process to."""
    job = _Job()
    previous = {sig: signal.signal(sig, job.pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield job
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def execute(run: Run, launcher: str | None) -> tuple[int, str]:
    """Run one job to the end, its output to a log file; echo its evaluations. (rc, last error line)
    Raises SweepStopped if a stop signal arrived meanwhile."""
    logs = run.run_dir.parent / "logs"
    configs = run.run_dir.parent / "configs"
    logs.mkdir(parents=True, exist_ok=True)
    configs.mkdir(parents=True, exist_ok=True)
    config_path = configs / f"{run.name}.yaml"
    config_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    last_error = ""
    # the log line by line: tail -f works
    with open(logs / f"{run.name}.log", "a", buffering=1) as log_file, _stops_passed_on() as job:
        process = subprocess.Popen(_command(run, config_path, launcher), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        job.started(process)
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            if any(marker in line for marker in ECHO_MARKERS):
                print(f"    {line.rstrip()}", flush=True)
            if line.startswith("matekd: error") or "Error" in line:
                last_error = line.strip()
        rc = process.wait()
    if job.received:
        raise SweepStopped(job.received[0], run.label)
    return rc, last_error


def _eta(runs: list[Run], durations: dict[str, list[float]]) -> str:
    known = [statistics.mean(durations[r.kind + (r.method or "")]) for r in runs
             if durations.get(r.kind + (r.method or ""))]
    if not known:
        return "unknown"
    # Runs of a kind not timed yet are guessed at the mean of the timed ones.
    total = sum(known) + (len(runs) - len(known)) * statistics.mean(known)
    return duration(total)


def run_all(runs: list[Run], launcher: str | None) -> list[str]:
    """Run what is not finished yet, in order; a run whose prerequisite failed is skipped.
    Returns the labels of failed or skipped runs."""
    todo = [r for r in runs if not r.completed()]
    print(f"[experiment] {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to go", flush=True)
    durations: dict[str, list[float]] = {}
    failed: set[str] = set()
    problems: list[str] = []
    for i, run in enumerate(todo, 1):
        if any(f"{run.task}/{need}" in failed for need in run.needs):
            failed.add(run.label)
            problems.append(f"{run.label} (skipped: {', '.join(run.needs)} failed)")
            continue
        print(f"[experiment] [{i}/{len(todo)}] {run.label} (ETA of the rest: {_eta(todo[i - 1:], durations)})",
              flush=True)
        started = time.time()
        rc, last_error = execute(run, launcher)
        elapsed = time.time() - started
        if rc != 0:
            failed.add(run.label)
            problems.append(f"{run.label} (exit {rc}: {last_error or 'see its log'})")
            print(f"[experiment]     FAILED after {duration(elapsed)}: "
                  f"{last_error or 'see ' + str(run.run_dir.parent / 'logs')}", flush=True)
            continue
        durations.setdefault(run.kind + (run.method or ""), []).append(elapsed)
        print(f"[experiment]     done in {duration(elapsed)}{_headline(run)}", flush=True)
    return problems


def _headline(run: Run) -> str:
    metrics = RunDir(run.run_dir).read_metrics()
    if run.kind == "generator":
        warm = metrics.get("generator_warmup") or {}
        if "dev_after" in warm:
            return (f": dev masked-token accuracy {warm['dev_before']['accuracy']:.3f} "
                    f"-> {warm['dev_after']['accuracy']:.3f}")
        return ""
    best = metrics.get("best")
    if not best:
        return ""
    return f": best dev {metrics.get('metric', 'main')} {100 * first_split(best['dev'])['main']:.2f}"
