"""`matekd experiment SPEC.yaml`: FT, KD and MATE-KD students over tasks and seeds, one table.

Per task, in order:
  1. the teacher: fine-tuned once (a `matekd train method=ft` run of the teacher model), or a
     fine-tuned checkpoint given in the spec;
  2. the generator: warmed up once with MLM on the task's text (`matekd warmup-generator`), if
     the spec asks for it; every MATE-KD seed then starts from the same warmed generator. It
     reads the text the teacher was fine-tuned on: the teacher.finetune `data` overrides apply
     to the warm-up too (not the students' smaller transfer sets);
  3. the students: every method x seed, each its own `matekd train` run directory; with
     `transfer_sizes`, every method x seed x size N, each distilled on the first N training
     examples (data.max_train_examples = N: nested sets, 500 of them inside the 1000) in
     <out>/<task>/n<N>/<method>-seed<k>, while teacher and generator are prepared once per task.

Each run is a separate process (optionally under a launcher such as `deepspeed --num_gpus 8`),
logs to logs/<run>.log beside its run directory, and is skipped when its metrics.json says
"completed", so rerunning the same command resumes an interrupted sweep (an interrupted run
continues from its checkpoint). SIGTERM or Ctrl-C to the runner reaches the running job too: it
checkpoints and stops, and the runner exits with 128 + the signal. Order: teachers and generators
first, then seed by seed (within a seed, smaller transfer sets first), so that a sweep cut short
still covers every task. At the end: <out>/results.json (task -> method -> per-seed best dev
main metric, in percent), results.md (mean ± std, and the students' mean training time),
details.json (teacher scores, curves, times) and dev_curves.png. With `transfer_sizes`, each
task and size is its own row, `<task>@<N>` (sst2@1000), every size of a task with the same
teacher.

Spec (YAML):
    output_dir: runs/minilm-glue
    report_dir: runs/minilm-glue      # optional; where results.* go (default: output_dir)
    tasks: {sst2: {data: {path: ../shared/data/glue/SST-2, max_train_examples: 2000}}, ...}
           # the key names the task's directory and report row, and is the run config's `task`
           # unless its overrides say otherwise: subj: {task: custom, data: {train_file: ...}}
    methods: [ft, kd, matekd]
    seeds: [1, 2, 3]
    base: {...}                       # run-config keys shared by every run
    method_overrides: {matekd: {...}} # run-config keys per method
    teacher: {model: PATH, finetune: {...run-config keys of the teacher's ft run...}}
             # or finetuned: {sst2: PATH, ...} to skip fine-tuning
    generator: {model: PATH, mlm_warmup: {matekd: {generator_mlm_warmup_steps: 300}}}
    transfer_sizes: [500, 1000, 2000] # optional; students per size, e.g. with a teacher trained
                                      # on everything: teacher.finetune.data.max_train_examples: null
    extends: transfer_sets.yaml       # optional; this spec deep-merged over that one (path relative
                                      # to this file): mappings merge key by key, lists replace
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from matekd_ds.config import METHODS, config_from_dict, merge, read_config_file
from matekd_ds.errors import MatekdError
from matekd_ds.run_dir import RunDir

SPEC_KEYS = {"output_dir", "report_dir", "tasks", "methods", "seeds", "base", "method_overrides", "teacher", "generator",
             "transfer_sizes"}
# Lines of a run's output worth echoing while it runs: evaluations, phase starts, errors.
ECHO_MARKERS = ("] step ", "fine-tuning for", "warm-up for", "] matekd for", "] kd for", "] ft for",
                "error", "Error", "Traceback")


@dataclass
class Run:
    task: str  # the spec's task name (its key in `tasks`); the run config's `task` is in config
    name: str  # "teacher", "generator", or "<method>-seed<k>"
    kind: str  # "teacher", "generator" or "student"
    config: dict[str, Any]
    run_dir: Path
    command: str = "train"  # or "warmup-generator"
    method: str | None = None
    seed: int | None = None
    needs: list[str] = field(default_factory=list)  # names of runs of the same task this one needs
    size: int | None = None  # a student's transfer-set size (spec transfer_sizes), else None

    @property
    def label(self) -> str:
        return f"{self.task}/{self.name}" if self.size is None else f"{self.task}/n{self.size}/{self.name}"

    @property
    def report_task(self) -> str:
        """The report row this run's scores go to: the task, or `<task>@<N>` for a transfer set."""
        return self.task if self.size is None else f"{self.task}@{self.size}"

    def completed(self) -> bool:
        return RunDir(self.run_dir).status() == "completed"


# ---------------------------------------------------------------------------------------------
# The spec and the plan


def _expand_env(value: Any, path: str | Path) -> Any:
    """${VAR} in any string of the spec (model paths differ between machines)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path) for v in value]
    if isinstance(value, str) and "$" in value:
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise MatekdError(f"experiment spec {path}: environment variable in '{value}' is not set")
        return expanded
    return value


def _read_extended(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec deep-merged over the spec its `extends:` names (a path relative to this spec's
    folder), so one arm of a sweep states only what it changes. Mappings merge key by key; lists
    and values replace."""
    if path.resolve() in chain:
        raise MatekdError(f"experiment spec {chain[0]}: 'extends' comes back to {path}")
    spec = read_config_file(path)
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    if not isinstance(parent, str) or not parent.strip():
        raise MatekdError(f"experiment spec {path}: 'extends' must name a spec file, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise MatekdError(f"experiment spec {path}: 'extends' names {parent_path}, which does not exist")
    return merge(_read_extended(parent_path, (*chain, path.resolve())), spec)


def read_spec(path: str | Path) -> dict[str, Any]:
    spec = _expand_env(_read_extended(Path(path)), path)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise MatekdError(f"experiment spec {path}: unknown key '{sorted(unknown)[0]}' (valid: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("output_dir", "tasks", "teacher"):
        if not spec.get(key):
            raise MatekdError(f"experiment spec {path}: '{key}' is required")
    if not isinstance(spec["tasks"], dict):
        raise MatekdError(f"experiment spec {path}: 'tasks' must map task names to run-config overrides")
    methods = spec.setdefault("methods", list(METHODS))
    overrides = spec.get("method_overrides") or {}
    for name in methods:  # a method, or a variant: a name whose overrides say `method: ...`
        if base_method(name, overrides) not in METHODS:
            raise MatekdError(f"experiment spec {path}: unknown method '{name}' (valid: {', '.join(METHODS)}, "
                              "or a variant name with method_overrides.<name>.method)")
    seeds = spec.setdefault("seeds", [1, 2, 3])
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise MatekdError(f"experiment spec {path}: 'seeds' must be a list of distinct integers")
    teacher = spec["teacher"]
    if not isinstance(teacher, dict) or not (teacher.get("model") or teacher.get("finetuned")):
        raise MatekdError(f"experiment spec {path}: teacher needs 'model' (fine-tuned per task) or 'finetuned' paths")
    if any(base_method(m, overrides) == "matekd" for m in methods) and not (spec.get("generator") or {}).get("model"):
        raise MatekdError(f"experiment spec {path}: method matekd needs generator.model")
    if spec.get("transfer_sizes") is not None:
        _check_transfer_sizes(spec["transfer_sizes"], path)
    return spec


def _check_transfer_sizes(sizes: Any, path: str | Path) -> None:
    where = f"experiment spec {path}: 'transfer_sizes'"
    if not isinstance(sizes, list) or not sizes:
        raise MatekdError(f"{where} must be a non-empty list of training-set sizes, got {sizes!r}")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool):
            raise MatekdError(f"{where} must hold integers (numbers of training examples), got {size!r}")
        if size <= 0:
            raise MatekdError(f"{where} must hold positive sizes, got {size}")
        if sizes.count(size) > 1:
            raise MatekdError(f"{where} lists {size} more than once")


def base_method(name: str, method_overrides: dict[str, Any]) -> str:
    """`kd`, or the method a variant such as `matekd-lr1e-5` names in its overrides."""
    return (method_overrides.get(name) or {}).get("method", name)


def _models(**values: Any) -> dict[str, Any]:
    return {"models": dict(values)}


def plan(spec: dict[str, Any]) -> list[Run]:
    """Every run of the sweep, each with its full run config, validated before anything runs."""
    out = Path(spec["output_dir"])
    base = spec.get("base") or {}
    method_overrides = spec.get("method_overrides") or {}
    teacher, generator = spec["teacher"], spec.get("generator") or {}
    teacher_data = {"data": (teacher.get("finetune") or {}).get("data") or {}}
    sizes: list[int | None] = sorted(spec.get("transfer_sizes") or []) or [None]
    runs: list[Run] = []
    for task, task_overrides in spec["tasks"].items():
        # the key is the config's task unless the overrides name one (task: custom)
        common = merge(merge(base, {"task": task}), task_overrides or {})
        task_dir = out / task
        finetuned = (teacher.get("finetuned") or {}).get(task)
        needs: list[str] = []
        if finetuned:
            teacher_path = str(finetuned)
        else:
            if not teacher.get("model"):
                raise MatekdError(f"experiment spec: no teacher for task {task} (teacher.model or teacher.finetuned.{task})")
            teacher_cfg = merge(merge(common, teacher.get("finetune") or {}), {
                "method": "ft", **_models(student=teacher["model"], student_init_from_teacher_layers=None,
                                          teacher_finetune_epochs=0)})
            runs.append(Run(task, "teacher", "teacher", teacher_cfg, task_dir / "teacher"))
            teacher_path = str(RunDir(task_dir / "teacher").model_dir("student_best"))
            needs.append("teacher")
        generator_path = generator.get("model")
        student_needs = list(needs)
        uses_generator = any(base_method(m, method_overrides) == "matekd" for m in spec["methods"])
        if uses_generator and generator.get("mlm_warmup"):
            # all the text the teacher saw, not a student's transfer set
            warm_cfg = merge(merge(merge(merge(common, method_overrides.get("matekd") or {}), teacher_data),
                                   generator["mlm_warmup"]), {
                "method": "matekd", **_models(teacher=teacher_path, generator=generator_path, teacher_finetune_epochs=0)})
            runs.append(Run(task, "generator", "generator", warm_cfg, task_dir / "generator",
                            command="warmup-generator", needs=list(needs)))
            generator_path = str(RunDir(task_dir / "generator").model_dir("generator_warm"))
        for size in sizes:
            students_dir = task_dir if size is None else task_dir / f"n{size}"
            for name in spec["methods"]:
                method = base_method(name, method_overrides)
                for seed in spec["seeds"]:
                    cfg = merge(merge(common, method_overrides.get(name) or {}), {
                        "method": method, "train": {"seed": seed},
                        **_models(teacher=teacher_path, teacher_finetune_epochs=0,
                                  **({"generator": generator_path} if generator_path else {})),
                    })
                    if method == "matekd":
                        cfg = merge(cfg, {"matekd": {"generator_mlm_warmup_steps": 0}})
                    if size is not None:  # the first N examples: the smaller sets lie inside the larger
                        cfg = merge(cfg, {"data": {"max_train_examples": size}})
                    run_needs = student_needs + (["generator"] if method == "matekd" and generator.get("mlm_warmup") else [])
                    runs.append(Run(task, f"{name}-seed{seed}", "student", cfg, students_dir / f"{name}-seed{seed}",
                                    method=name, seed=seed, needs=run_needs, size=size))
    # Preparation first; then seed by seed (smaller transfer sets first), so that a sweep cut
    # short still covers every task.
    order = {seed: i for i, seed in enumerate(spec["seeds"])}
    runs.sort(key=lambda r: (r.kind == "student", order.get(r.seed, -1), r.size or 0))
    for run in runs:
        run.config = merge(run.config, {"output": {"dir": str(run.run_dir)}, "logging": {"progress": False}})
        try:
            config_from_dict(json.loads(json.dumps(run.config)))
        except MatekdError as err:
            raise MatekdError(f"experiment run {run.label}: {err}") from None
    return runs


# ---------------------------------------------------------------------------------------------
# Running


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


@contextmanager
def _stops_passed_on_to(process: subprocess.Popen):
    """While a job runs, SIGTERM or SIGINT to the runner (kill, a scheduler, Ctrl-C) goes on to
    the job, which checkpoints at its next safe point and exits; the runner keeps logging until it
    has, then stops the sweep. Yields a list that holds the signals received."""
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
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
    with open(logs / f"{run.name}.log", "a", buffering=1) as log_file:  # line by line: tail -f works
        process = subprocess.Popen(_command(run, config_path, launcher), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        with _stops_passed_on_to(process) as received:
            for line in process.stdout:
                log_file.write(line)
                if any(marker in line for marker in ECHO_MARKERS):
                    print(f"    {line.rstrip()}", flush=True)
                if line.startswith("matekd: error") or "Error" in line:
                    last_error = line.strip()
            rc = process.wait()
    if received:
        raise SweepStopped(received[0], run.label)
    return rc, last_error


def _eta(runs: list[Run], durations: dict[str, list[float]]) -> str:
    known = [statistics.mean(durations[r.kind + (r.method or "")]) for r in runs
             if durations.get(r.kind + (r.method or ""))]
    if not known:
        return "unknown"
    # Runs of a kind not timed yet are guessed at the mean of the timed ones.
    total = sum(known) + (len(runs) - len(known)) * statistics.mean(known)
    return _duration(total)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
        print(f"[experiment] [{i}/{len(todo)}] {run.label} (ETA of the rest: {_eta(todo[i - 1:], durations)})", flush=True)
        started = time.time()
        rc, last_error = execute(run, launcher)
        elapsed = time.time() - started
        if rc != 0:
            failed.add(run.label)
            problems.append(f"{run.label} (exit {rc}: {last_error or 'see its log'})")
            print(f"[experiment]     FAILED after {_duration(elapsed)}: {last_error or 'see ' + str(run.run_dir.parent / 'logs')}", flush=True)
            continue
        durations.setdefault(run.kind + (run.method or ""), []).append(elapsed)
        print(f"[experiment]     done in {_duration(elapsed)}{_headline(run)}", flush=True)
    return problems


def _headline(run: Run) -> str:
    metrics = RunDir(run.run_dir).read_metrics()
    if run.kind == "generator":
        warm = metrics.get("generator_warmup") or {}
        if "dev_after" in warm:
            return f": dev masked-token accuracy {warm['dev_before']['accuracy']:.3f} -> {warm['dev_after']['accuracy']:.3f}"
        return ""
    best = metrics.get("best")
    if not best:
        return ""
    return f": best dev {metrics.get('metric', 'main')} {100 * _first_split(best['dev'])['main']:.2f}"


def _first_split(dev: dict[str, dict[str, float]]) -> dict[str, float]:
    return next(iter(dev.values()))


# ---------------------------------------------------------------------------------------------
# The report


def mean_std_cell(values: list[float]) -> str:
    """A report cell: mean ± sample std over seeds, and how many there were."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})"


def report_rows(runs: list[Run]) -> dict[str, list[str]]:
    """Task -> its report rows: the task itself, or `<task>@<N>` per transfer size, smaller first."""
    sizes: dict[str, set[int | None]] = {}
    for run in runs:
        sizes.setdefault(run.task, set())
        if run.kind == "student":
            sizes[run.task].add(run.size)
    return {task: [task if n is None else f"{task}@{n}" for n in sorted(found, key=lambda n: n or 0)] or [task]
            for task, found in sizes.items()}


def collect(runs: list[Run]) -> dict[str, Any]:
    """Per report row (a task, or a task and transfer size): the metric, the teacher's score, each
    method's per-seed best and final dev main metric (percent) with its dev curve and training
    time, and wall-clock time: the row's student runs plus its task's teacher and generator runs,
    which every size of the task shares."""
    rows = report_rows(runs)
    tasks: dict[str, Any] = {row: {"metric": None, "teacher": None, "methods": {}, "wall_seconds": 0.0}
                             for task_rows in rows.values() for row in task_rows}
    for run in runs:
        metrics = RunDir(run.run_dir).read_metrics()
        if metrics.get("status") != "completed":
            continue
        if run.kind != "student":  # the preparation of every row of the task
            for row in rows[run.task]:
                tasks[row]["wall_seconds"] += metrics.get("wall_seconds", 0.0)
                if run.kind == "generator":
                    tasks[row]["generator_warmup"] = metrics.get("generator_warmup")
            continue
        task = tasks[run.report_task]
        task["wall_seconds"] += metrics.get("wall_seconds", 0.0)
        task["metric"] = metrics["metric"]
        if "teacher" in metrics:
            task["teacher"] = 100 * _first_split(metrics["teacher"]["dev"])["main"]
        entry = task["methods"].setdefault(run.method, {"seeds": [], "best": [], "final": [], "curves": [],
                                                        "train_seconds": []})
        entry["seeds"].append(run.seed)
        entry["best"].append(100 * _first_split(metrics["best"]["dev"])["main"])
        entry["final"].append(100 * _first_split(metrics["final"])["main"])
        entry["curves"].append([(e["step"], 100 * _first_split(e["dev"])["main"]) for e in metrics["evaluations"]])
        entry["train_seconds"].append(metrics["throughput"]["train_seconds"])
        entry.setdefault("losses", []).append(mean_scalars(RunDir(run.run_dir).logs / "scalars.csv"))
    return tasks


def mean_scalars(path: Path) -> dict[str, float]:
    """The run-average of each logged loss (student/div_perturbed, generator/gen_div, ...):
    how far the student is from the teacher on clean and on perturbed text."""
    sums: dict[str, list[float]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines()[1:]:
        _, name, value, *_ = line.split(",")
        if name.startswith(("student/", "generator/")) and not name.endswith(("lr", "samples_per_s")):
            sums.setdefault(name, []).append(float(value))
    return {name: statistics.mean(values) for name, values in sorted(sums.items())}


def results_table(tasks: dict[str, Any], methods: list[str]) -> str:
    names = list(tasks)
    header = "| method | " + " | ".join(f"{t} ({tasks[t]['metric'] or '?'})" for t in names) + " | average |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    teacher_row = [tasks[t]["teacher"] for t in names]
    if any(v is not None for v in teacher_row):
        shown = [f"{v:.2f}" if v is not None else "–" for v in teacher_row]
        known = [v for v in teacher_row if v is not None]
        avg = f"{statistics.mean(known):.2f}" if len(known) == len(names) else "–"
        lines.append("| teacher | " + " | ".join(shown) + f" | {avg} |")
    for method in methods:
        cells, means = [], []
        for t in names:
            entry = tasks[t]["methods"].get(method)
            if not entry or not entry["best"]:
                cells.append("–")
                continue
            means.append(statistics.mean(entry["best"]))
            cells.append(mean_std_cell(entry["best"]))
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(names) else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def training_time_table(tasks: dict[str, Any], methods: list[str]) -> str | None:
    """Mean training time of a student run per method and row, from what collect() recorded
    (metrics.json throughput.train_seconds); None when no entry has it."""
    names = list(tasks)
    lines = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    found = False
    for method in methods:
        cells = []
        for t in names:
            seconds = (tasks[t]["methods"].get(method) or {}).get("train_seconds")
            found = found or bool(seconds)
            cells.append(_duration(statistics.mean(seconds)) if seconds else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if found else None


def finished_wall_seconds(runs: list[Run]) -> float:
    """Wall-clock time of the finished runs, each counted once (rows of one task share its teacher)."""
    total = 0.0
    for run in runs:
        metrics = RunDir(run.run_dir).read_metrics()
        if metrics.get("status") == "completed":
            total += metrics.get("wall_seconds", 0.0)
    return total


def plot_curves(tasks: dict[str, Any], methods: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[experiment] matplotlib is not installed (pip install -e '.[bench]'): no dev-curve plot")
        return False
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, task) in zip(axes.flat, tasks.items()):
        for method in methods:
            entry = task["methods"].get(method)
            if not entry or not entry["curves"]:
                continue
            steps = [s for s, _ in entry["curves"][0]]
            aligned = [c for c in entry["curves"] if [s for s, _ in c] == steps]
            mean = [statistics.mean(c[i][1] for c in aligned) for i in range(len(steps))]
            std = [statistics.stdev(c[i][1] for c in aligned) if len(aligned) > 1 else 0.0 for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        if task["teacher"] is not None:
            ax.axhline(task["teacher"], color="grey", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(name)
        ax.set_xlabel("student step")
        ax.set_ylabel(f"dev {task['metric'] or ''}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(spec: dict[str, Any], runs: list[Run]) -> Path:
    out = Path(spec.get("report_dir") or spec["output_dir"])  # several specs may share output_dir
    out.mkdir(parents=True, exist_ok=True)
    tasks = collect(runs)
    methods = spec["methods"]
    raw = {t: {m: task["methods"][m]["best"] for m in methods if m in task["methods"]} for t, task in tasks.items()}
    (out / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(tasks, indent=2) + "\n")
    table = results_table(tasks, methods)
    plotted = plot_curves(tasks, methods, out / "dev_curves.png")
    wall = finished_wall_seconds(runs)
    text = [
        "Best dev score of each student run (percent; accuracy, F1 for MRPC, Pearson for STS-B), "
        "mean ± sample std over seeds.",
        "",
        table,
        "",
    ]
    times = training_time_table(tasks, methods)
    if times:
        caption = ("Mean training time of a student run (its training steps, without start-up and "
                   "evaluation; details.json train_seconds):")
        text += [caption, "", times, ""]
    text.append(f"Wall-clock time of the finished runs: {_duration(wall)}.")
    if plotted:
        text += ["", "Dev curves (mean ± std over seeds): dev_curves.png"]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"[experiment] results: {out / 'results.md'}, {out / 'results.json'}, {out / 'details.json'}", flush=True)
    return out


def main(spec_path: str, dry_run: bool = False, launcher: str | None = None, report_only: bool = False) -> int:
    spec = read_spec(spec_path)
    runs = plan(spec)
    if dry_run:
        for run in runs:
            state = "done" if run.completed() else "todo"
            print(f"[{state}] {run.label:28s} {run.command} -> {run.run_dir}")
        return 0
    try:
        problems = [] if report_only else run_all(runs, launcher)
    except SweepStopped as stop:
        print(f"matekd: {stop}", file=sys.stderr)
        return stop.exit_code
    write_report(spec, runs)
    if problems:
        print("[experiment] not finished: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0
