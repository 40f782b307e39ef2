"""The report of a sweep from its finished runs' metrics.json: results.json, results.md (mean ±
std per method and row, training times) and details.json, beside the dev-curve plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from matekd_ds.experiment.plan import Run
from matekd_ds.experiment.plot import plot_curves
from matekd_ds.run_dir import RunDir


def first_split(dev: dict[str, dict[str, float]]) -> dict[str, float]:
    """The scores of the first split a run evaluated (metrics.json keys them by split name)."""
    return next(iter(dev.values()))


def duration(seconds: float) -> str:
    """`1h05m`, or `4m09s` under an hour."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
            task["teacher"] = 100 * first_split(metrics["teacher"]["dev"])["main"]
        entry = task["methods"].setdefault(run.method, {"seeds": [], "best": [], "final": [], "curves": [],
                                                        "train_seconds": []})
        entry["seeds"].append(run.seed)
        entry["best"].append(100 * first_split(metrics["best"]["dev"])["main"])
        entry["final"].append(100 * first_split(metrics["final"])["main"])
        entry["curves"].append([(e["step"], 100 * first_split(e["dev"])["main"]) for e in metrics["evaluations"]])
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
            cells.append(duration(statistics.mean(seconds)) if seconds else "–")
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
        ("Best dev score of each student run (percent; accuracy, F1 for MRPC, Pearson for STS-B), "
         "mean ± sample std over seeds."),
        "",
        table,
        "",
    ]
    times = training_time_table(tasks, methods)
    if times:
        caption = ("Mean training time of a student run (its training steps, without start-up and "
                   "evaluation; details.json train_seconds):")
        text += [caption, "", times, ""]
    text.append(f"Wall-clock time of the finished runs: {duration(wall)}.")
    if plotted:
        text += ["", "Dev curves (mean ± std over seeds): dev_curves.png"]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"[experiment] results: {out / 'results.md'}, {out / 'results.json'}, {out / 'details.json'}", flush=True)
    return out
