"""GLUE metrics computed locally with numpy (no ``evaluate``, no downloads).

Degenerate inputs never produce NaN: a correlation with a constant side is 0.0, MCC with an
all-zero denominator is 0.0 and F1 with no positives predicted or true is 0.0 (as sklearn's
default ``zero_division`` behaviour, minus the warning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from matekd_ds.data.glue import TaskSpec
from matekd_ds.errors import MatekdError

METRIC_NAMES = ("accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman")


def _paired(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as flat arrays of equal, non-zero length."""
    preds_array = np.asarray(preds).reshape(-1)
    labels_array = np.asarray(labels).reshape(-1)
    if preds_array.shape != labels_array.shape:
        raise MatekdError(
            f"metric inputs differ in length: {preds_array.size} predictions, "
            f"{labels_array.size} labels"
        )
    if preds_array.size == 0:
        raise MatekdError("cannot compute metrics on zero examples")
    return preds_array, labels_array


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    preds_array, labels_array = _paired(preds, labels)
    return float(np.mean(preds_array == labels_array))


def f1(preds: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2tp / (2tp + fp + fn); 0.0 when tp + fp + fn == 0."""
    preds_array, labels_array = _paired(preds, labels)
    predicted = preds_array == positive
    actual = labels_array == positive
    true_pos = int(np.sum(predicted & actual))
    false_pos = int(np.sum(predicted & ~actual))
    false_neg = int(np.sum(~predicted & actual))
    denominator = 2 * true_pos + false_pos + false_neg
    return 0.0 if denominator == 0 else 2 * true_pos / denominator


def f1_macro(preds: ArrayLike, labels: ArrayLike) -> float:
    """The mean of each class's F1 over the classes that occur in labels or predictions
    (sklearn's average="macro"): every class counts the same, however rare."""
    preds_array, labels_array = _paired(preds, labels)
    classes = np.union1d(preds_array, labels_array)
    return float(np.mean([f1(preds_array, labels_array, positive=c) for c in classes]))


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K; equals the binary MCC for 2 classes).

    With confusion matrix C (rows true, columns predicted), t = row sums, p = column sums,
    c = trace, s = total:  (c*s - p.t) / sqrt((s^2 - p.p) * (s^2 - t.t)); 0.0 when undefined.
    """
    preds_array, labels_array = _paired(preds, labels)
    classes, encoded = np.unique(np.concatenate([labels_array, preds_array]), return_inverse=True)
    true_ids, pred_ids = encoded[: labels_array.size], encoded[labels_array.size :]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    numerator = correct * total - pred_counts @ true_counts
    denominator_sq = (total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts)
    return 0.0 if denominator_sq <= 0 else float(numerator / np.sqrt(denominator_sq))


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either side is constant (instead of NaN)."""
    preds_array, labels_array = _paired(preds, labels)
    x = preds_array.astype(np.float64) - preds_array.astype(np.float64).mean()
    y = labels_array.astype(np.float64) - labels_array.astype(np.float64).mean()
    scale = np.sqrt((x @ x) * (y @ y))
    if scale == 0.0:
        return 0.0
    return float(np.clip((x @ y) / scale, -1.0, 1.0))


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation with average ranks for ties; 0.0 when a side is constant."""
    preds_array, labels_array = _paired(preds, labels)
    return pearson(rankdata(preds_array), rankdata(labels_array))


_METRIC_FUNCTIONS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_macro": f1_macro,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(
    names: Sequence[str], predictions: ArrayLike, labels: ArrayLike
) -> dict[str, float]:
    """Each named metric on ``predictions`` (class ids, or floats for pearson/spearman)."""
    unknown = [name for name in names if name not in _METRIC_FUNCTIONS]
    if unknown:
        names_text = ", ".join(map(repr, unknown))
        raise MatekdError(f"unknown metric {names_text}; valid metrics: {', '.join(METRIC_NAMES)}")
    return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in names}


def predictions_from_outputs(task: TaskSpec, outputs: ArrayLike) -> np.ndarray:
    """Class ids (argmax over logits [N, C]) or regression values ([N] or [N, 1])."""
    outputs_array = np.asarray(outputs)
    if task.is_regression:
        if outputs_array.ndim == 2 and outputs_array.shape[1] == 1:
            outputs_array = outputs_array[:, 0]
        if outputs_array.ndim != 1:
            raise MatekdError(
                f"{task.name} is a regression task: expected outputs of shape [N] or [N, 1], "
                f"got {list(outputs_array.shape)}"
            )
        return outputs_array.astype(np.float64)
    if outputs_array.ndim == 1:
        return outputs_array  # already class ids
    if outputs_array.ndim != 2 or outputs_array.shape[1] != task.num_labels:
        raise MatekdError(
            f"{task.name} has {task.num_labels} classes: expected logits of shape "
            f"[N, {task.num_labels}] or class ids [N], got {list(outputs_array.shape)}"
        )
    return outputs_array.argmax(axis=1)


def task_metrics(task: TaskSpec, outputs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """``task.metrics`` computed from model outputs, plus ``"main"`` = ``task.main_metric``."""
    results = compute_metrics(task.metrics, predictions_from_outputs(task, outputs), labels)
    results["main"] = results[task.main_metric]
    return results


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts, rows the true class, columns the predicted one."""
    preds_array, labels_array = _paired(preds, labels)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels_array.astype(np.int64), preds_array.astype(np.int64)), 1)
    return matrix


def classification_report(preds: ArrayLike, labels: ArrayLike, label_names: Sequence[str]) -> dict:
    """The confusion matrix and each class's precision, recall, F1 and support (its number of
    true examples); a ratio with nothing to divide by is 0.0."""
    matrix = confusion_matrix(preds, labels, len(label_names))
    true_counts, pred_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    per_class = {}
    for c, name in enumerate(label_names):
        hits = int(matrix[c, c])
        precision = hits / pred_counts[c] if pred_counts[c] else 0.0
        recall = hits / true_counts[c] if true_counts[c] else 0.0
        both = precision + recall
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(2 * precision * recall / both) if both else 0.0,
                           "support": int(true_counts[c])}
    return {"labels": list(label_names), "confusion_matrix": matrix.tolist(), "per_class": per_class}
