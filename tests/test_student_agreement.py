"""benchmarks/quality/student_agreement.py: the per-student comparison with the teacher and the
per-method summary over seeds."""

import json
import math

import pytest
import torch
from helpers import load_benchmark_script

from matekd_ds.data.glue import get_task


@pytest.fixture(scope="module")
def agreement():
    return load_benchmark_script("quality/student_agreement.py")


def test_compare_counts_accuracy_agreement_and_kl(agreement):
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    out = agreement.compare(get_task("sst2"), student, teacher, labels)
    assert out["acc"] == out["score"] == pytest.approx(1 / 3)  # predicts class 0 everywhere; gold is 0, 1, 1
    assert out["agree"] == pytest.approx(2 / 3)  # the teacher says 0, 1, 0
    p, q = teacher.softmax(-1), student.softmax(-1)
    assert out["kl"] == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-6)
    assert agreement.compare(get_task("sst2"), teacher, teacher, labels)["kl"] == pytest.approx(0.0, abs=1e-7)


def test_compare_scores_a_pair_task_by_its_main_metric(agreement):
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # predicts 1, 1, 1, 0
    out = agreement.compare(get_task("mrpc"), student, teacher, torch.tensor([1, 0, 1, 1]))
    # MRPC's main metric is F1 of class 1: 2 true positives, 1 false positive, 1 false negative
    assert out["score"] == out["f1"] == pytest.approx(2 / 3)
    assert out["acc"] == pytest.approx(0.5)
    assert out["agree"] == pytest.approx(0.5)


def test_compare_on_regression_reports_correlations_and_the_squared_distance_to_the_teacher(agreement):
    labels = torch.tensor([0.0, 1.0, 2.0, 5.0])
    student = torch.tensor([[0.5], [1.0], [3.0], [4.0]])  # the same order as the labels
    teacher = torch.tensor([[0.5], [2.0], [3.0], [4.0]])
    out = agreement.compare(get_task("stsb"), student, teacher, labels)
    assert set(out) == {"score", "pearson", "spearman", "mse_to_teacher"}
    assert out["spearman"] == pytest.approx(1.0)
    expected = torch.corrcoef(torch.stack([student[:, 0], labels]))[0, 1].item()
    assert out["score"] == out["pearson"] == pytest.approx(expected, rel=1e-6)
    assert out["mse_to_teacher"] == pytest.approx(0.25)  # one of four differs by 1


def test_summary_groups_seeds_of_a_method(agreement):
    per_run = {"kd-seed1": {"acc": 0.5}, "kd-seed2": {"acc": 0.7}, "matekd-3l-seed1": {"acc": 0.6}}
    table = agreement.summarise(per_run)
    assert set(table) == {"kd", "matekd-3l"}
    assert table["kd"]["acc"] == f"0.6000 ± {math.sqrt(0.02):.4f} (n=2)"
    assert table["matekd-3l"]["acc"] == "0.6000 ± 0.0000 (n=1)"


def test_only_finished_student_runs_are_compared(agreement, tmp_path):
    for name, status in (("kd-seed1", "completed"), ("kd-seed2", "running"), ("teacher", "completed")):
        (tmp_path / name / "student_best").mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": status}))
    (tmp_path / "ft-seed1").mkdir()  # no metrics.json yet
    assert [r.name for r in agreement.student_runs(tmp_path)] == ["kd-seed1"]


def test_only_keeps_the_students_measured_with_the_same_perturbation(tmp_path, agreement):
    out = tmp_path / "agreement.json"
    assert agreement.kept_runs(out, 0.3, 0, 500) == {}  # nothing measured yet
    row = {"score": 0.8, "acc": 0.8, "acc_perturbed_kept": 0.7}
    out.write_text(json.dumps({"mask_prob": 0.3, "examples": 500, "runs": {"kd-seed1": row}}))
    assert agreement.kept_runs(out, 0.3, 0, 500) == {"kd-seed1": row}  # seed 0 when not recorded
    for other in ((0.2, 0, 500), (0.3, 1, 500), (0.3, 0, 499), (0.3, 0, 500, "heldout.tsv")):
        with pytest.raises(SystemExit, match="another perturbation"):
            agreement.kept_runs(out, *other)  # another rate, sample, size or text


def test_checkpoint_final_compares_each_runs_last_export_and_never_merges_with_best(tmp_path, agreement):
    for name, exports in (("kd-seed1", ("student_best", "student")), ("kd-seed2", ("student_best",))):
        for export in exports:
            (tmp_path / name / export).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert [r.name for r in agreement.student_runs(tmp_path, agreement.CHECKPOINTS["final"])] == ["kd-seed1"]
    assert len(agreement.student_runs(tmp_path, agreement.CHECKPOINTS["best"])) == 2
    out = tmp_path / "agreement.json"
    out.write_text(json.dumps({"mask_prob": 0.3, "examples": 500,
                               "runs": {"kd-seed1": {"score": 0.8, "acc": 0.8}}}))
    assert agreement.kept_runs(out, 0.3, 0, 500, None, "best")  # no checkpoint recorded: best
    with pytest.raises(SystemExit, match="another perturbation or checkpoint"):
        agreement.kept_runs(out, 0.3, 0, 500, None, "final")


def test_only_refuses_to_merge_with_rows_missing_a_column(tmp_path, agreement):
    out = tmp_path / "agreement.json"
    out.write_text(json.dumps({"mask_prob": 0.3, "examples": 500, "runs": {"kd-seed1": {"acc": 0.8}}}))
    with pytest.raises(SystemExit, match="predates score"):
        agreement.kept_runs(out, 0.3, 0, 500)


def test_label_kept_subset_is_where_the_teacher_is_right_before_and_after_the_rewrite(agreement):
    labels = [0, 1, 1, 0]
    teacher_clean = [[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]  # right, right, right, wrong
    teacher_noisy = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]  # right, wrong, right, right
    kept = agreement.rewrite_kept_label(teacher_clean, teacher_noisy, labels)
    assert kept.tolist() == [True, False, True, False]
    student_noisy = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]  # right, right, wrong, right
    assert agreement.accuracy(student_noisy, labels, kept) == pytest.approx(0.5)  # examples 0 and 2 only


def test_data_reads_a_labeled_file_in_the_tasks_format_and_names_a_bad_one(tmp_path, agreement):
    from matekd_ds.config import config_from_dict
    from matekd_ds.data.tasks import task_spec

    cfg = config_from_dict({"task": "custom", "data": {
        "train_file": "unused.tsv", "dev_file": "unused.tsv", "text_columns": ["sentence"], "label_column": "label",
        "label_names": ["neg", "pos"]}})
    heldout = tmp_path / "heldout.tsv"
    heldout.write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\ndull\tneg\n")
    examples = agreement.heldout_examples(cfg, task_spec(cfg), str(heldout))
    assert [e.label for e in examples] == [1, 0, 0]
    heldout.write_text("sentence\tlabel\ngood film\tmaybe\n")
    with pytest.raises(SystemExit, match="--data .*heldout.tsv.*unknown label 'maybe'"):
        agreement.heldout_examples(cfg, task_spec(cfg), str(heldout))
