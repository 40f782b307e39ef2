"""Metrics against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from matekd_ds.data.glue import GLUE_TASKS, get_task
from matekd_ds.errors import MatekdError
from matekd_ds.metrics import (
    METRIC_NAMES,
    accuracy,
    classification_report,
    compute_metrics,
    confusion_matrix,
    f1,
    f1_macro,
    matthews_corrcoef,
    pearson,
    spearman,
    task_metrics,
)

# preds  1 1 0 0 1
# labels 1 0 0 1 1
#        tp fp tn fn tp  -> tp=2, fp=1, tn=1, fn=1
PREDS = [1, 1, 0, 0, 1]
LABELS = [1, 0, 0, 1, 1]


def test_accuracy_hand_case() -> None:
    # correct at positions 0, 2, 4 -> 3/5
    assert accuracy(PREDS, LABELS) == pytest.approx(0.6)


def test_f1_hand_case() -> None:
    # 2tp / (2tp + fp + fn) = 4 / (4 + 1 + 1)
    assert f1(PREDS, LABELS) == pytest.approx(4 / 6)


def test_f1_of_the_other_class() -> None:
    # positive=0: tp=1 (pos 2), fp=1 (pos 3), fn=1 (pos 1) -> 2 / 4
    assert f1(PREDS, LABELS, positive=0) == pytest.approx(0.5)


def test_f1_without_any_positive_is_zero() -> None:
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0


def test_binary_matthews_hand_case() -> None:
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 6)


def test_multiclass_matthews_hand_case() -> None:
    labels = [0, 1, 2, 0, 1, 2]
    preds = [0, 2, 1, 0, 0, 2]
    # confusion (rows true, cols pred): [[2,0,0],[1,0,1],[0,1,1]]
    # t = [2,2,2], p = [3,1,2], c = trace = 3, s = 6
    # numerator = c*s - p.t = 18 - 12 = 6
    # denominator = sqrt((36 - p.p)(36 - t.t)) = sqrt((36 - 14)(36 - 12)) = sqrt(528)
    assert matthews_corrcoef(preds, labels) == pytest.approx(6 / math.sqrt(528))


def test_matthews_extremes() -> None:
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # every prediction the same class: the formula is 0/0, reported as 0.0
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0


def test_pearson_hand_case() -> None:
    # x - mean = [-1, 0, 1]; y - mean = [-4/3, -1/3, 5/3]
    # sum dx*dy = 3, sum dx^2 = 2, sum dy^2 = 42/9
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))


def test_spearman_with_ties_uses_average_ranks() -> None:
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -0.5, 0.5, 1.5]
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_spearman_is_one_for_monotone_data() -> None:
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)


def test_perfect_negative_correlation() -> None:
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0], [30.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_constant_input_gives_zero_not_nan() -> None:
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0


def test_correlations_match_scipy_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    x_tied = np.round(x, 1)  # rounding creates ties for the rank code
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x_tied, y) == pytest.approx(stats.spearmanr(x_tied, y)[0])


def test_metrics_reject_length_mismatch_and_empty_input() -> None:
    with pytest.raises(MatekdError, match="differ in length"):
        accuracy([1, 0], [1])
    with pytest.raises(MatekdError, match="zero examples"):
        pearson([], [])


def test_compute_metrics_by_name() -> None:
    results = compute_metrics(["accuracy", "f1"], PREDS, LABELS)
    assert results == pytest.approx({"accuracy": 0.6, "f1": 4 / 6})


def test_compute_metrics_unknown_name_lists_valid_names() -> None:
    with pytest.raises(MatekdError, match="unknown metric 'bleu'.*accuracy, f1"):
        compute_metrics(["accuracy", "bleu"], PREDS, LABELS)


def test_every_task_uses_known_metrics() -> None:
    for task in GLUE_TASKS.values():
        assert set(task.metrics) <= set(METRIC_NAMES)
        assert task.main_metric in task.metrics


def test_task_metrics_takes_argmax_of_logits() -> None:
    # argmax of each row gives PREDS
    logits = np.array([[0.1, 0.9], [-1.0, 2.0], [3.0, 0.0], [0.5, 0.2], [0.0, 0.1]])
    results = task_metrics(get_task("mrpc"), logits, LABELS)
    assert set(results) == {"accuracy", "f1", "main"}
    assert results["main"] == results["f1"] == pytest.approx(4 / 6)
    assert results["accuracy"] == pytest.approx(0.6)


def test_task_metrics_for_cola_and_mnli() -> None:
    cola = task_metrics(get_task("CoLA"), np.eye(2)[PREDS], LABELS)
    assert cola == pytest.approx({"matthews": 1 / 6, "main": 1 / 6})
    mnli = task_metrics(get_task("mnli"), np.eye(3)[[0, 2, 1]], np.array([0, 2, 2]))
    assert mnli == pytest.approx({"accuracy": 2 / 3, "main": 2 / 3})


def test_task_metrics_for_regression_accepts_column_vector() -> None:
    outputs = np.array([[1.0], [2.0], [3.0]])
    results = task_metrics(get_task("STS-B"), outputs, [1.0, 2.0, 4.0])
    assert set(results) == {"pearson", "spearman", "main"}
    assert results["main"] == results["pearson"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert results["spearman"] == pytest.approx(1.0)


def test_task_metrics_rejects_wrong_logit_shape() -> None:
    with pytest.raises(MatekdError, match=r"mnli has 3 classes.*\[5, 2\]"):
        task_metrics(get_task("mnli"), np.zeros((5, 2)), LABELS)
    with pytest.raises(MatekdError, match="regression"):
        task_metrics(get_task("stsb"), np.zeros((3, 2)), [1.0, 2.0, 3.0])


# Three classes, by hand:
# labels 0 0 1 1 2 2
# preds  0 1 1 1 0 2
# class 0: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
# class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 4/5
# class 2: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3
THREE_LABELS = [0, 0, 1, 1, 2, 2]
THREE_PREDS = [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_rows_true_columns_predicted() -> None:
    assert confusion_matrix(THREE_PREDS, THREE_LABELS, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # a class nobody predicted or has still gets its row and column
    assert confusion_matrix([0, 0], [0, 0], 3).tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_classification_report_hand_case() -> None:
    report = classification_report(THREE_PREDS, THREE_LABELS, ["a", "b", "c"])
    assert report["labels"] == ["a", "b", "c"]
    expected = {"a": (1 / 2, 1 / 2, 1 / 2, 2), "b": (2 / 3, 1.0, 4 / 5, 2), "c": (1.0, 1 / 2, 2 / 3, 2)}
    for name, (precision, recall, f1_value, support) in expected.items():
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1_value)
        assert row["support"] == support


def test_classification_report_class_never_predicted_has_zero_precision() -> None:
    report = classification_report([0, 0, 0], [0, 1, 1], ["x", "y"])
    assert report["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_f1_macro_is_the_mean_of_per_class_f1() -> None:
    assert f1_macro(THREE_PREDS, THREE_LABELS) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert compute_metrics(["f1_macro"], THREE_PREDS, THREE_LABELS)["f1_macro"] == pytest.approx(59 / 90)
    # binary f1 would report class 1 alone: 4/5
    assert f1(THREE_PREDS, THREE_LABELS) == pytest.approx(4 / 5)


def test_binary_f1_on_a_multiclass_custom_task_is_refused() -> None:
    from matekd_ds.config import config_from_dict
    from matekd_ds.data.tasks import custom_spec

    def spec(metrics, names):
        return custom_spec(config_from_dict({"task": "custom", "data": {
            "train_file": "t.jsonl", "dev_file": "d.jsonl", "label_names": names, "metrics": metrics,
            "main_metric": metrics[0]}}))

    with pytest.raises(MatekdError,
                       match="f1 is the F1 of class 1 of a binary task; this task has 6 classes: use f1_macro"):
        spec(["f1"], list("abcdef"))
    assert spec(["f1_macro"], list("abcdef")).metrics == ("f1_macro",)
    assert spec(["f1"], ["no", "yes"]).metrics == ("f1",)  # binary: F1 of class 1, as GLUE's
