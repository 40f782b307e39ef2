#!/usr/bin/env python
"""The headline table of docs/results.md for a `matekd experiment` sweep with transfer_sizes:
per row (task@N), the teacher's dev score, the generator's masked-token accuracy, and per method
the best dev score (mean ± std over seeds); from student_agreement.py's JSON, the best checkpoint's
accuracy on the text it measured (the dev set, or its --data), on that text perturbed (all of it,
and the rewrites that kept the label as the teacher judges them) and the agreement with the
teacher there; and the mean training time. Then MATE-KD − KD and KD − FT on the best dev score,
and the same gaps on what student_agreement.py measured (clean, perturbed and label-kept accuracy;
with its --data, on a held-out set).

    matekd experiment benchmarks/quality/transfer_sets.yaml --report-only
    python benchmarks/quality/student_agreement.py runs/transfer-sets/sst2/n1000 \
        --out runs/transfer-sets/sst2/n1000/agreement.json
    ...                                                  (the same for subj, trec)
    python benchmarks/quality/transfer_table.py runs/transfer-sets [--json docs/results.json]
    python benchmarks/quality/transfer_table.py runs/transfer-sets/arm-epochs10 --runs runs/transfer-sets \
        --methods ft-e10,kd-e10,matekd-e10                  # a recipe arm (its report_dir)
    ... --agreement agreement_heldout.json                   # student_agreement.py --data ... --out that name

--json writes the headline sweep as task -> method -> per-seed best dev scores (percent).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matekd_ds.experiment.report import mean_std_cell


def agreement_of(runs: Path, row: str, name: str = "agreement.json") -> dict | None:
    task, size = row.split("@")
    path = runs / task / f"n{size}" / name
    return json.loads(path.read_text()) if path.is_file() else None


def per_run_agreement(agreement: dict | None, method: str, key: str) -> list[float]:
    if not agreement:
        return []
    return [100 * values[key] for name, values in sorted(agreement["runs"].items())
            if name.rsplit("-seed", 1)[0] == method and key in values]


def cell(values: list[float]) -> str:
    return mean_std_cell(values) if values else "–"


def table(out: Path, methods: list[str], runs: Path, agreement_name: str = "agreement.json") -> str:
    details = json.loads((out / "details.json").read_text())
    lines = ["| task@N | teacher | generator MLM acc | method | best dev | clean acc | perturbed acc "
             "| perturbed acc, label kept | agreement on perturbed | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, d in details.items():
        warm = (d.get("generator_warmup") or {}).get("dev_after", {}).get("accuracy")
        agreement = agreement_of(runs, row, agreement_name)
        for method in methods:
            entry = d["methods"].get(method)
            if not entry:
                continue
            measured = [cell(per_run_agreement(agreement, method, key))
                        for key in ("acc", "acc_perturbed", "acc_perturbed_kept", "agree_perturbed")]
            lines.append(" | ".join([
                f"| {row}", f"{d['teacher']:.2f}" if d.get("teacher") else "–", f"{100 * warm:.1f}%" if warm else "–",
                method, mean_std_cell(entry["best"]), *measured, f"{statistics.mean(entry['train_seconds']):.0f} s |"]))
    return "\n".join(lines)


def gaps(out: Path, ft: str = "ft", kd: str = "kd", matekd: str = "matekd") -> str:
    """Per row and averaged over rows: MATE-KD − KD and KD − FT of the mean best dev score; an arm
    names its own three methods (`--methods ft-e10,kd-e10,matekd-e10`)."""
    details = json.loads((out / "details.json").read_text())
    rows, mk_kd, kd_ft = [], [], []
    for row, d in details.items():
        m = {k: statistics.mean(v["best"]) for k, v in d["methods"].items()}
        if {ft, kd, matekd} <= set(m):
            mk_kd.append(m[matekd] - m[kd])
            kd_ft.append(m[kd] - m[ft])
            rows.append(f"{row}: MATE-KD − KD {mk_kd[-1]:+.2f}, KD − FT {kd_ft[-1]:+.2f}")
    if mk_kd:
        rows.append(f"average over {len(mk_kd)} rows: MATE-KD − KD {statistics.mean(mk_kd):+.2f}, "
                    f"KD − FT {statistics.mean(kd_ft):+.2f}")
    return "\n".join(rows)


MEASURED = (("acc", "clean"), ("acc_perturbed", "perturbed"), ("acc_perturbed_kept", "perturbed, label kept"))


def measured_gaps(out: Path, runs: Path, ft: str = "ft", kd: str = "kd", matekd: str = "matekd",
                  agreement_name: str = "agreement.json") -> str:
    """Per row and averaged over the rows measured, from student_agreement.py's JSON: MATE-KD − KD
    of the mean accuracy on its clean text, its perturbed text and the label-kept rewrites, and
    KD − FT on the clean text. With --data those are a held-out set, not the dev set the
    checkpoints were picked on."""
    details = json.loads((out / "details.json").read_text())
    lines, found = [], {}

    def gap(agreement, high, low, key):
        a, b = per_run_agreement(agreement, high, key), per_run_agreement(agreement, low, key)
        return statistics.mean(a) - statistics.mean(b) if a and b else None

    columns = [(f"MATE-KD − KD {label}", matekd, kd, key) for key, label in MEASURED] \
        + [("KD − FT clean", kd, ft, "acc")]
    for row in details:
        agreement = agreement_of(runs, row, agreement_name)
        parts = []
        for name, high, low, key in columns:
            value = gap(agreement, high, low, key)
            if value is not None:
                found.setdefault(name, []).append(value)
                parts.append(f"{name} {value:+.2f}")
        if parts:
            lines.append(f"{row} ({agreement_name}): " + ", ".join(parts))
    if found:
        lines.append(f"average ({agreement_name}): " + ", ".join(
            f"{name} {statistics.mean(values):+.2f} ({len(values)} rows)" for name, values in found.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the sweep's output_dir (with results.json and details.json)")
    parser.add_argument("--methods", default="ft,kd,matekd",
                        help="the table's methods; the gaps read the first three as FT, KD and MATE-KD")
    parser.add_argument("--runs", type=Path, help="the output_dir with <task>/n<N>/agreement.json, when `out` "
                        "is an arm's report_dir (default: out)")
    parser.add_argument("--agreement", default="agreement.json", help="student_agreement.py's --out name under "
                        "<task>/n<N>/, e.g. agreement_mask15.json for a 15%% rewrite")
    parser.add_argument("--json", type=Path, help="write task -> method -> per-seed best dev scores here")
    parser.add_argument("--json-names", help="the methods' names in --json, in --methods order (an arm's "
                        "ft-e10,kd-e10,matekd-e10 written as ft,kd,matekd)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    print(table(args.out, methods, args.runs or args.out, args.agreement))
    print()
    if len(methods) >= 3:
        print(gaps(args.out, *methods[:3]))
        print(measured_gaps(args.out, args.runs or args.out, *methods[:3], args.agreement))
    if args.json:
        results = json.loads((args.out / "results.json").read_text())
        names = dict(zip(methods, args.json_names.split(","), strict=True)) if args.json_names else {}
        args.json.write_text(json.dumps({task: {names.get(m, m): results[task][m]
                                                for m in methods if m in results[task]}
                                         for task in results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
