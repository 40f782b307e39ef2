#!/usr/bin/env python
"""The headline table of docs/results.md for a `matekd experiment` sweep with transfer_sizes:
per row (task@N), the teacher's dev score, the generator's masked-token accuracy, and per method
the best dev score (mean ± std over seeds), the accuracy on generator-perturbed dev text and the
agreement with the teacher there (from student_agreement.py's JSON), and the mean training time.

    matekd experiment benchmarks/quality/transfer_sets.yaml --report-only
    python benchmarks/quality/student_agreement.py runs/transfer-sets/sst2/n1000 --out runs/transfer-sets/sst2/n1000/agreement.json
    ...                                                  (the same for subj, trec)
    python benchmarks/quality/transfer_table.py runs/transfer-sets [--json docs/results.json]
    python benchmarks/quality/transfer_table.py runs/transfer-sets/arm-epochs10 --runs runs/transfer-sets \
        --methods ft-e10,kd-e10,matekd-e10                  # a recipe arm (its report_dir)

--json writes the headline sweep as task -> method -> per-seed best dev scores (percent).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matekd_ds.experiment import mean_std_cell


def agreement_of(runs: Path, row: str) -> dict | None:
    task, size = row.split("@")
    path = runs / task / f"n{size}" / "agreement.json"
    return json.loads(path.read_text()) if path.is_file() else None


def per_run_agreement(agreement: dict | None, method: str, key: str) -> list[float]:
    if not agreement:
        return []
    return [100 * values[key] for name, values in sorted(agreement["runs"].items()) if name.rsplit("-seed", 1)[0] == method]


def table(out: Path, methods: list[str], runs: Path) -> str:
    details = json.loads((out / "details.json").read_text())
    lines = ["| task@N | teacher | generator MLM acc | method | best dev | perturbed dev acc | agreement on perturbed | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for row, d in details.items():
        warm = (d.get("generator_warmup") or {}).get("dev_after", {}).get("accuracy")
        agreement = agreement_of(runs, row)
        for method in methods:
            entry = d["methods"].get(method)
            if not entry:
                continue
            perturbed = per_run_agreement(agreement, method, "acc_perturbed")
            agree = per_run_agreement(agreement, method, "agree_perturbed")
            lines.append(" | ".join([
                f"| {row}", f"{d['teacher']:.2f}" if d.get("teacher") else "–", f"{100 * warm:.1f}%" if warm else "–",
                method, mean_std_cell(entry["best"]), mean_std_cell(perturbed) if perturbed else "–",
                mean_std_cell(agree) if agree else "–", f"{statistics.mean(entry['train_seconds']):.0f} s |"]))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the sweep's output_dir (with results.json and details.json)")
    parser.add_argument("--methods", default="ft,kd,matekd",
                        help="the table's methods; the gaps read the first three as FT, KD and MATE-KD")
    parser.add_argument("--runs", type=Path, help="the output_dir with <task>/n<N>/agreement.json, when `out` "
                        "is an arm's report_dir (default: out)")
    parser.add_argument("--json", type=Path, help="write task -> method -> per-seed best dev scores here")
    parser.add_argument("--json-names", help="the methods' names in --json, in --methods order (an arm's "
                        "ft-e10,kd-e10,matekd-e10 written as ft,kd,matekd)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    print(table(args.out, methods, args.runs or args.out))
    print()
    print(gaps(args.out, *methods[:3]) if len(methods) >= 3 else "")
    if args.json:
        results = json.loads((args.out / "results.json").read_text())
        names = dict(zip(methods, args.json_names.split(","), strict=True)) if args.json_names else {}
        args.json.write_text(json.dumps({task: {names.get(m, m): results[task][m] for m in methods if m in results[task]}
                                         for task in results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
