"""How closely each finished student of a `matekd experiment` task follows its teacher, on the
clean dev set and on the same dev set perturbed the MATE-KD way (the warmed generator fills 30%
masked tokens; one fixed sample, shared by every student).

MATE-KD trains the student to match the teacher on such perturbed text. This measures whether it
did: per student (its best-dev checkpoint, or with `--checkpoint final` its last), and as
mean ± std per method over the seeds,
- acc / acc_perturbed: accuracy against the gold labels on clean / perturbed dev text;
- agree / agree_perturbed: the fraction of dev examples where student and teacher predict the
  same class;
- kl / kl_perturbed: KL(teacher || student) of the output distributions, mean over examples;
- acc_perturbed_kept: accuracy on the perturbed examples whose rewrite kept the label as far as
  the teacher can tell (it predicts the gold label on both the clean and the perturbed text). A
  30% rewrite by a weak generator often changes what a sentence says, and there the gold label is
  no longer the right answer; on this subset it still is.
- score / score_perturbed: the task's main metric (accuracy, F1 for MRPC, Pearson for STS-B), and
  its other metrics by name (f1, pearson, spearman).
Regression tasks (STS-B) have no acc, agree, kl or acc_perturbed_kept: mse_to_teacher (the mean
squared difference to the teacher's score) takes the place of agree and kl.

    python benchmarks/quality/student_agreement.py runs/minilm-glue/sst2 [--out agreement.json]
    python benchmarks/quality/student_agreement.py runs/transfer-sets/sst2/n1000   # a transfer-set size
    ... --out agreement.json --only 'matekd-glr'   # these students only, merged into --out's others
    ... --data heldout.tsv --out agreement_heldout.json   # a labeled file in place of the dev set
    ... --checkpoint final   # each run's last checkpoint (student/) instead of its best on dev

The perturbation, the metrics and the comparison are the product's
(matekd_ds/robustness.py, what `matekd eval RUN --perturbed` reports for one run); this script
applies them to every student of an experiment at once, with one shared perturbed copy.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np
import torch

from matekd_ds import models
from matekd_ds.config import config_from_dict
from matekd_ds.data.batching import encode
from matekd_ds.data.tasks import load_task_data
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation import predict
from matekd_ds.evaluation_cli import DataOptions, labeled_sets
from matekd_ds.robustness import Perturbation, compare_to_teacher, perturbed_copy, scores
from matekd_ds.run_dir import RunDir

BATCH = 128
DEVICE = torch.device("cpu")


def compare(spec, student, teacher, labels) -> dict[str, float]:
    """The task's metrics against the gold labels (score: the main one; acc for classification),
    and the product's agreement and KL(teacher || student), or for regression the squared
    difference to the teacher (matekd_ds.robustness, what `matekd eval RUN --perturbed` reports)."""
    student, teacher, labels = (np.asarray(x, dtype=np.float64) for x in (student, teacher, labels))
    to_teacher = compare_to_teacher(student, teacher, regression=spec.is_regression)
    return {**task_scores(spec, student, labels), **{TO_TEACHER_KEYS[k]: v for k, v in to_teacher.items()}}


TO_TEACHER_KEYS = {"agreement": "agree", "kl": "kl", "mse_to_teacher": "mse_to_teacher"}  # this file's names


def task_scores(spec, outputs, labels) -> dict[str, float]:
    """score (the task's main metric), acc for a classification task, and the task's other metrics."""
    values = scores(spec, outputs, labels)
    out = {"score": values.pop("main")}
    if not spec.is_regression:
        out["acc"] = values.pop("accuracy")
    return {**out, **values}


def rewrite_kept_label(teacher_clean, teacher_noisy, labels) -> np.ndarray:
    """The examples whose rewrite the teacher still labels correctly, having labelled the clean
    text correctly: the best judge of "the label survived the rewrite" these runs have."""
    labels = np.asarray(labels)
    return (np.asarray(teacher_clean).argmax(-1) == labels) & (np.asarray(teacher_noisy).argmax(-1) == labels)


def accuracy(logits, labels, subset: np.ndarray | slice = slice(None)) -> float:
    """Accuracy of the argmax against the gold labels, over `subset` (a boolean mask) or all."""
    return float(np.mean(np.asarray(logits).argmax(-1)[subset] == np.asarray(labels)[subset]))


def heldout_examples(cfg, spec, source: str):
    """The labeled examples of `source`, read the way `matekd eval --data` reads them."""
    try:
        return next(iter(labeled_sets(cfg, spec, DataOptions(sources=[source]), []).values()))
    except MatekdError as error:
        raise SystemExit(f"student_agreement: --data {source}: {error}") from None


CHECKPOINTS = {"best": "student_best", "final": "student"}  # --checkpoint -> the run's export


def student_runs(task_dir: Path, export: str = "student_best") -> list[Path]:
    """The finished student runs (<method>-seed<k>) of one task, as the experiment runner sees them."""
    return sorted(r for r in task_dir.iterdir() if re.search(r"-seed\d+$", r.name)
                  and RunDir(r).model_dir(export).is_dir() and RunDir(r).status() == "completed")


def generator_run(task_dir: Path) -> Path:
    """The task's warmed generator: <task>/generator, or for one transfer-set size of a sweep
    with transfer_sizes (<task>/n<N>) the task's shared one, <task>/generator."""
    for candidate in (task_dir / "generator", task_dir.parent / "generator"):
        if candidate.is_dir():
            return candidate
    raise SystemExit(f"student_agreement: no warmed generator in {task_dir} or {task_dir.parent}")


def kept_runs(out: Path | None, mask_prob: float, seed: int, examples: int,
              data: str | None = None, checkpoint: str = "best") -> dict[str, dict[str, float]]:
    """The students already measured in `out` with the same perturbation of the same text (and
    the same checkpoint of each run), to merge with."""
    if out is None or not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if (old.get("mask_prob"), old.get("seed", 0), old.get("examples"), old.get("data"),
            old.get("checkpoint", "best")) != (mask_prob, seed, examples, data, checkpoint):
        raise SystemExit(f"student_agreement: {out} was measured with another perturbation or checkpoint; "
                         "rerun without --only")
    if any("score" not in row for row in old["runs"].values()):
        raise SystemExit(f"student_agreement: {out} predates score; rerun without --only")
    return old["runs"]


def summarise(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    by_method: dict[str, list[dict[str, float]]] = {}
    for name, row in per_run.items():
        by_method.setdefault(re.sub(r"-seed\d+$", "", name), []).append(row)
    table = {}
    for method, rows in by_method.items():
        table[method] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[method][key] = f"{statistics.mean(values):.4f} ± {std:.4f} (n={len(values)})"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_dir", type=Path,
                        help="one task of a matekd experiment output_dir, e.g. runs/x/sst2 (or runs/x/sst2/n1000)")
    parser.add_argument("--mask-prob", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--data", metavar="FILE", help="measure on this labeled file (the task's format, as "
                        "`matekd eval --data` reads it) instead of the dev set: e.g. a held-out split")
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="best",
                        help="each run's best-on-dev checkpoint (student_best/, default) or its last (student/)")
    parser.add_argument("--only", metavar="REGEX", help="measure only the students whose run name matches; "
                        "the other students of an existing --out (same perturbation) are kept")
    args = parser.parse_args()

    export = CHECKPOINTS[args.checkpoint]
    runs = [r for r in student_runs(args.task_dir, export) if not args.only or re.search(args.only, r.name)]
    if not runs:
        raise SystemExit(f"student_agreement: no finished student runs in {args.task_dir}")
    cfg = config_from_dict(RunDir(runs[0]).read_config())
    data = load_task_data(cfg)
    spec, regression = data.spec, data.spec.is_regression
    warm = RunDir(generator_run(args.task_dir)).model_dir("generator_warm")
    tokenizer = models.load_tokenizer(str(warm))
    examples = heldout_examples(cfg, data.spec, args.data) if args.data else next(iter(data.dev.values()))
    dev = encode(examples, tokenizer, cfg.data.max_length, False)
    labels = np.asarray(dev.labels)
    pad = tokenizer.pad_token_id

    generator = models.load_generator(str(warm), tokenizer).eval()
    settings = Perturbation(str(warm), args.mask_prob, cfg.matekd.gumbel_tau, args.seed)
    noisy = perturbed_copy(dev, generator, tokenizer, settings, DEVICE)
    teacher = models.load_classifier("teacher", cfg.models.teacher, spec.num_labels, tokenizer, regression).eval()
    teacher_clean, teacher_noisy = (predict(teacher, dev, BATCH, pad, DEVICE),
                                    predict(teacher, noisy, BATCH, pad, DEVICE))

    label_kept = None if regression else rewrite_kept_label(teacher_clean, teacher_noisy, labels)
    per_run = kept_runs(args.out, args.mask_prob, args.seed, len(dev), args.data, args.checkpoint) \
        if args.only else {}
    for run in runs:
        student = models.load_classifier("student", str(RunDir(run).model_dir(export)), spec.num_labels,
                                         tokenizer, regression).eval()
        clean = compare(spec, predict(student, dev, BATCH, pad, DEVICE), teacher_clean, labels)
        student_noisy = predict(student, noisy, BATCH, pad, DEVICE)
        perturbed = compare(spec, student_noisy, teacher_noisy, labels)
        per_run[run.name] = {**clean, **{f"{k}_perturbed": v for k, v in perturbed.items()}}
        if label_kept is not None:
            per_run[run.name]["acc_perturbed_kept"] = accuracy(student_noisy, labels, label_kept)
        print(run.name, json.dumps({k: round(v, 4) for k, v in per_run[run.name].items()}), flush=True)

    teacher_row = {**task_scores(spec, teacher_clean, labels),
                   **{f"{k}_perturbed": v for k, v in task_scores(spec, teacher_noisy, labels).items()}}
    if label_kept is not None:
        teacher_row["rewrites_kept_label"] = float(np.mean(label_kept))
    per_run = dict(sorted(per_run.items()))
    table = summarise(per_run)
    keys = list(next(iter(per_run.values())))
    print("\n| method | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for method, row in table.items():
        print(f"| {method} | " + " | ".join(row[k] for k in keys) + " |")
    print(f"teacher: {json.dumps({k: round(v, 4) for k, v in teacher_row.items()})}")
    if args.out:
        args.out.write_text(json.dumps({"task_dir": str(args.task_dir), "data": args.data, "mask_prob": args.mask_prob,
                                        "seed": args.seed, "checkpoint": args.checkpoint, "examples": len(dev),
                                        "metric": spec.main_metric,
                                        "teacher": teacher_row,
                                        "runs": per_run, "summary": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
