#!/usr/bin/env python
"""The leading table of docs/results.md (issue 27): per task, each arm's score on a test split
that no model trained on and no run selected on, for the best-on-dev checkpoint and the last one,
mean ± std over seeds; then the gaps the question needs (MATE-KD − KD, KD − FT, and MATE-KD − the
frozen generator, paired by seed, with their spread).

It reads student_agreement.py's JSON of each task's transfer-set folder: one file measured on the
best checkpoints, one on the final ones, both with --data the test split.

    python benchmarks/quality/student_agreement.py runs/transfer-sets/sst2/n1000 \
        --data runs/transfer-sets/heldout/sst2.tsv --out runs/transfer-sets/sst2/n1000/agreement_test.json
    ... --checkpoint final --out runs/transfer-sets/sst2/n1000/agreement_test_final.json
    python benchmarks/quality/test_table.py runs/transfer-sets --tasks sst2 \
        --methods ft-e10=ft,kd-e10=kd,kd-random,kd-frozen,matekd-e10-lw-bf16-g2=matekd,kd-equal-time \
        [--json docs/results.json]
    ... --tasks sst2,subj=runs/test-split,trec=runs/test-split   # a task from another sweep's output_dir
    python benchmarks/quality/test_table.py --stored docs/transfer_sets --tasks sst2,subj ...
        # the copies kept in docs/transfer_sets (agreement_test_<task>.json, agreement_test_final_<task>.json)

The score is the task's main metric (accuracy; F1 for MRPC, Pearson for STS-B). --json writes
task -> method (its short name) -> per-seed test score of the best checkpoint, in percent, seeds
in order; tasks without a measured file are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matekd_ds.errors import MatekdError
from matekd_ds.experiment.report import mean_std_cell


def parse_methods(text: str) -> dict[str, str]:
    """'run-name=short,...' (or just 'name') -> {run method name: short name}, in order."""
    pairs = {}
    for item in text.split(","):
        run_name, _, short = item.partition("=")
        pairs[run_name.strip()] = (short or run_name).strip()
    return pairs


def seed_of(run_name: str) -> tuple[str, int]:
    method, _, seed = run_name.rpartition("-seed")
    if not method or not seed.isdigit():
        raise MatekdError(f"run '{run_name}' is not named <method>-seed<N>")
    return method, int(seed)


def score(values: dict) -> float | None:
    """The task's main metric of one measured row (student_agreement.py's score: accuracy, F1 for
    MRPC, Pearson for STS-B); files written before it had score hold accuracy only, as acc."""
    return values.get("score", values.get("acc"))


def per_seed(agreement: dict | None, method: str) -> dict[int, float]:
    """seed -> 100 × the score of each run of `method` in one student_agreement.py file."""
    if not agreement:
        return {}
    found = {}
    for name, values in agreement["runs"].items():
        run_method, seed = seed_of(name)
        if run_method == method and score(values) is not None:
            found[seed] = 100 * score(values)
    return dict(sorted(found.items()))


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cell(values: dict[int, float]) -> str:
    return mean_std_cell(list(values.values())) if values else "–"


def paired_diffs(high: dict[int, float], low: dict[int, float]) -> list[float]:
    """high − low for each seed both arms have, in seed order."""
    return [high[s] - low[s] for s in sorted(set(high) & set(low))]


def gap_text(diffs: list[float]) -> str:
    """Mean ± std of paired differences, and how many seeds."""
    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    seeds = "1 seed" if len(diffs) == 1 else f"{len(diffs)} seeds"
    return f"{statistics.mean(diffs):+.2f}{spread} ({seeds})"


def stored_name(name: str, task: str) -> str:
    """A measured file as kept in docs/transfer_sets: agreement_test.json -> agreement_test_sst2.json."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{task}{dot}{suffix}" if dot else f"{name}_{task}"


def measured(runs: Path | None, tasks: list[str], size: int, best_name: str, final_name: str,
             stored: Path | None = None):
    """task -> (best-checkpoint file, final-checkpoint file, test examples). Read from the sweep's
    <runs>/<task>/n<size>/, or for task=ROOT from ROOT's, or with `stored` from the copies kept
    there as <name>_<task>.json (the runs themselves are not kept)."""
    out = {}
    for entry in tasks:
        task, _, root = entry.partition("=")  # task=ROOT: this task's sweep is another output_dir
        if stored is not None and not root:
            best, final = (read(stored / stored_name(n, task)) for n in (best_name, final_name))
        else:
            folder = Path(root or runs) / task / f"n{size}"
            best, final = read(folder / best_name), read(folder / final_name)
        if best or final:
            out[task] = (best, final, (best or final)["examples"])
    return out


def table(found: dict, methods: dict[str, str]) -> str:
    lines = ["| task (metric, test rows) | teacher | " + " | ".join(methods.values()) + " |",
             "|---|---|" + "---|" * len(methods)]
    for task, (best, final, examples) in found.items():
        measured_file = best or final
        teacher, metric = score(measured_file["teacher"]), measured_file.get("metric", "accuracy")
        cells = [f"{cell(per_seed(best, m))} / {cell(per_seed(final, m))}" for m in methods]
        lines.append(f"| {task} ({metric}, {examples}) | {100 * teacher:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# "regime": MATE-KD where its adversary's objective works (generator lr 1e-4, cycle 10:20), when
# --methods names an arm so (adversary_regime_test_split.yaml)
GAPS = (("matekd", "kd"), ("kd", "ft"), ("matekd", "kd-frozen"), ("matekd", "kd-random"),
        ("kd-frozen", "kd"), ("matekd", "kd-equal-time"), ("regime", "kd-frozen"), ("regime", "matekd"))


def gaps(found: dict, methods: dict[str, str]) -> str:
    """Per task and on average over the tasks that have both arms: the paired gaps of GAPS, on the
    best checkpoints and on the final ones."""
    by_short = {short: run_name for run_name, short in methods.items()}
    lines, means = [], {}
    for task, (best, final, _) in found.items():
        parts = []
        for high, low in GAPS:
            if high not in by_short or low not in by_short:
                continue
            for label, agreement in (("best", best), ("final", final)):
                diffs = paired_diffs(per_seed(agreement, by_short[high]), per_seed(agreement, by_short[low]))
                if diffs:
                    parts.append(f"{high} − {low} ({label}) {gap_text(diffs)}")
                    means.setdefault((high, low, label), []).append(statistics.mean(diffs))
        if parts:
            lines.append(f"{task}: " + "; ".join(parts))
    for (high, low, label), values in means.items():
        lines.append(f"average over {len(values)} tasks: {high} − {low} ({label}) {statistics.mean(values):+.2f}")
    return "\n".join(lines)


def results_json(found: dict, methods: dict[str, str]) -> dict:
    return {task: {short: list(per_seed(best, run_name).values())
                   for run_name, short in methods.items() if per_seed(best, run_name)}
            for task, (best, _, _) in found.items() if best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", help="the sweep's output_dir (<task>/n<N>/ holds the JSON files)")
    parser.add_argument("--stored", type=Path, metavar="DIR", help="read the files kept in DIR as "
                        "<name>_<task>.json (docs/transfer_sets) instead of a sweep's output_dir")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, in table order; "
                        "task=DIR reads that task from the output_dir DIR instead of RUNS")
    parser.add_argument("--methods", required=True, help="run method names in column order, each optionally "
                        "=short name (ft-e10=ft); the gaps use the short names ft, kd, kd-frozen, ...")
    parser.add_argument("--size", type=int, default=1000, help="the transfer-set size folder (n<N>)")
    parser.add_argument("--best", default="agreement_test.json", help="the best-checkpoint file's name")
    parser.add_argument("--final", default="agreement_test_final.json", help="the final-checkpoint file's name")
    parser.add_argument("--json", type=Path, help="write task -> method -> per-seed test score (best) here")
    args = parser.parse_args()
    try:
        methods = parse_methods(args.methods)
        if (args.runs is None) == (args.stored is None):
            raise MatekdError("name a sweep's output_dir or --stored DIR (one of them)")
        found = measured(args.runs, args.tasks.split(","), args.size, args.best, args.final, args.stored)
        if not found:
            where = f"{args.stored}/<name>_<task>.json" if args.stored else f"{args.runs}/<task>/n{args.size}/"
            raise MatekdError(f"no {args.best} or {args.final} under {where}")
    except MatekdError as e:
        raise SystemExit(f"error: {e}") from None
    print("test score, best-on-dev checkpoint / final checkpoint (mean ± std over seeds)")
    print(table(found, methods))
    print()
    print(gaps(found, methods))
    if args.json:
        args.json.write_text(json.dumps(results_json(found, methods), indent=2) + "\n")


if __name__ == "__main__":
    main()
