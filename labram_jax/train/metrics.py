"""Evaluation metrics of the LaBraM paper, over a whole split, in plain numpy.

The original scores TUAB and TUEV with pyhealth 1.1.4 (`binary_metrics_fn`, `multiclass_metrics_fn`), which call
scikit-learn. These functions reproduce scikit-learn's values (checked against scikit-learn 1.9.1 in
tests/test_metrics.py), following its algorithms step by step so that ties and rounding come out the same, without
needing scikit-learn at run time. Gather the outputs of every host before calling them: the metrics do not
decompose over shards.

* binary (one logit per sample): the probability is sigmoid(logit), as the original computes it before scoring.
  `roc_auc` is sklearn's `roc_auc_score` (trapezoidal area under the ROC curve, ties count as half), `pr_auc` is
  `average_precision_score` (the step-wise sum of precision times recall increments, not a trapezoid), and
  `accuracy` and `balanced_accuracy` use the prediction probability >= 0.5.
* multiclass (logits of shape (N, C)): prediction = argmax of the logits (first index on ties, like np.argmax).
  `balanced_accuracy` is the mean recall over the classes that occur in y_true; `cohen_kappa` is unweighted
  Cohen's kappa; `f1_weighted` is the per-class F1 averaged with the class supports as weights.
* regression: `pearson_r` as scipy.stats.pearsonr, `r2` as sklearn's r2_score.

Undefined values are nan, never an exception or a warning, so a bad evaluation split cannot crash a training run:
`roc_auc` when y_true holds one class only (as scikit-learn 1.9 does), `cohen_kappa` when y_true and the
predictions are all one and the same class, `pearson_r` for a constant input or fewer than two samples, and `r2` for
fewer than two samples. Elsewhere sklearn's conventions hold: with one class in y_true `pr_auc` is 0.0 (no
positives) or 1.0 (all positive), and `r2` is 1.0 for a perfect prediction of a constant target and 0.0 for an
imperfect one. The original LaBraM instead reports 0.0 for all four binary metrics when y_true holds one class.
Empty or non-finite inputs, mismatched lengths and labels outside the task's classes raise ValueError.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

BINARY_KEYS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc")
MULTICLASS_KEYS = ("accuracy", "balanced_accuracy", "cohen_kappa", "f1_weighted")
REGRESSION_KEYS = ("pearson_r", "r2")


def binary_metrics(y_true: npt.ArrayLike, logits_or_probs: npt.ArrayLike, *,
                   from_logits: bool = True) -> dict[str, float]:
    """accuracy, balanced_accuracy, roc_auc and pr_auc of one score per sample; y_true holds 0s and 1s.

    Shapes (N,) or (N, 1). With from_logits=False the scores are taken as probabilities as they are.
    """
    y = _labels(y_true, 2)
    score = _column(logits_or_probs, "logits_or_probs")
    _check_lengths(y, score)
    prob = _sigmoid(score) if from_logits else score
    pred = (prob >= 0.5).astype(np.int64)
    confusion = _confusion(y, pred)
    tps, fps = _cumulative_counts(y, prob)
    return {"accuracy": _accuracy(confusion), "balanced_accuracy": _balanced_accuracy(confusion),
            "roc_auc": _roc_auc(tps, fps), "pr_auc": _average_precision(tps, fps)}


def multiclass_metrics(y_true: npt.ArrayLike, logits: npt.ArrayLike) -> dict[str, float]:
    """accuracy, balanced_accuracy, cohen_kappa and f1_weighted of argmax(logits); logits (N, C), y_true in [0, C)."""
    scores = _class_scores(logits)
    y = _labels(y_true, scores.shape[1])
    _check_lengths(y, scores)
    confusion = _confusion(y, np.argmax(scores, axis=1))
    return {"accuracy": _accuracy(confusion), "balanced_accuracy": _balanced_accuracy(confusion),
            "cohen_kappa": _cohen_kappa(confusion), "f1_weighted": _f1_weighted(confusion)}


def roc_curve(y_true: npt.ArrayLike, logits_or_probs: npt.ArrayLike, *,
              from_logits: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The false and true positive rates of sklearn's `roc_curve` (drop_intermediate=True): the points whose area
    is `roc_auc`, from (0, 0) to (1, 1). A rate is nan where y_true holds no negatives or no positives."""
    y = _labels(y_true, 2)
    score = _column(logits_or_probs, "logits_or_probs")
    _check_lengths(y, score)
    return _roc_points(*_cumulative_counts(y, _sigmoid(score) if from_logits else score))


def confusion_matrix(kind: Literal["binary", "multiclass"], y_true: npt.ArrayLike,
                     logits: npt.ArrayLike) -> np.ndarray:
    """Counts [true class, predicted class] over all the task's classes, predicted as the metrics predict."""
    if kind == "binary":
        score = _column(logits, "logits")
        classes, pred = 2, (_sigmoid(score) >= 0.5).astype(np.int64)
    elif kind == "multiclass":
        scores = _class_scores(logits)
        classes, pred = scores.shape[1], np.argmax(scores, axis=1)
    else:
        raise ValueError(f"a confusion matrix needs a binary or multiclass task, not {kind!r}")
    y = _labels(y_true, classes)
    _check_lengths(y, pred)
    return np.bincount(y * classes + pred, minlength=classes * classes).reshape(classes, classes)


def regression_metrics(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> dict[str, float]:
    """pearson_r and r2 of one prediction per sample; shapes (N,) or (N, 1)."""
    y = _column(y_true, "y_true")
    pred = _column(y_pred, "y_pred")
    _check_lengths(y, pred)
    return {"pearson_r": _pearson_r(y, pred), "r2": _r2(y, pred)}


def task_metrics(kind: Literal["binary", "multiclass", "regression"], y_true: npt.ArrayLike,
                 outputs: npt.ArrayLike) -> dict[str, float]:
    """The metrics of a task kind from the model's raw outputs (logits for the classification kinds)."""
    if kind == "binary":
        return binary_metrics(y_true, outputs)
    if kind == "multiclass":
        return multiclass_metrics(y_true, outputs)
    if kind == "regression":
        return regression_metrics(y_true, outputs)
    raise ValueError(f"unknown task kind {kind!r}")


def mean_std(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over runs (e.g. seeds 0-4), as the paper reports them.

    The std is the population std (ddof=0): neither the paper nor the LaBraM code says which one its tables use.
    A nan in any run makes that metric's mean and std nan, so an undefined run is not silently averaged away.
    """
    if not runs:
        raise ValueError("mean_std needs at least one run")
    keys = list(runs[0])
    if any(set(run) != set(keys) for run in runs):
        raise ValueError("every run must report the same metrics")
    stacked = {key: np.array([run[key] for run in runs], dtype=np.float64) for key in keys}
    return {key: (float(np.mean(values)), float(np.std(values))) for key, values in stacked.items()}


def _column(values: npt.ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) or (N, 1), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    _check_finite(array, name)
    return array


def _class_scores(logits: npt.ArrayLike) -> np.ndarray:
    scores = np.asarray(logits, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {scores.shape}")
    _check_finite(scores, "logits")
    return scores


def _labels(y_true: npt.ArrayLike, num_classes: int) -> np.ndarray:
    values = _column(y_true, "y_true")
    labels = values.astype(np.int64)
    if np.any(labels != values) or np.any(labels < 0) or np.any(labels >= num_classes):
        raise ValueError(f"y_true must hold class indices in [0, {num_classes})")
    return labels


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains nan or inf")


def _check_lengths(y_true: np.ndarray, outputs: np.ndarray) -> None:
    if len(y_true) != len(outputs):
        raise ValueError(f"y_true has {len(y_true)} samples but the outputs have {len(outputs)}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Two branches so that neither exp overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts (true, predicted) over the labels seen in either, ascending: sklearn's `confusion_matrix` labels.

    Restricting to those labels (rather than all classes) keeps the float sums below in sklearn's order.
    """
    labels, index = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n = labels.size
    return np.bincount(index[:len(y_true)] * n + index[len(y_true):], minlength=n * n).reshape(n, n)


def _accuracy(confusion: np.ndarray) -> float:
    return float(np.trace(confusion) / confusion.sum())


def _balanced_accuracy(confusion: np.ndarray) -> float:
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diagonal(confusion)[present] / support[present]))


def _cohen_kappa(confusion: np.ndarray) -> float:
    counts = confusion.astype(np.float64)
    expected = np.outer(counts.sum(axis=0), counts.sum(axis=1)) / counts.sum()
    disagree = 1 - np.eye(len(counts))
    chance = np.sum(disagree * expected)
    if chance == 0:
        return float("nan")
    return float(1 - np.sum(disagree * counts) / chance)


def _f1_weighted(confusion: np.ndarray) -> float:
    tp = np.diagonal(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    # Every label here occurs in y_true or y_pred, so the denominator is positive.
    f1 = 2 * tp / (support + confusion.sum(axis=0)).astype(np.float64)
    return float(np.sum(f1 * support) / support.sum())


def _cumulative_counts(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each distinct score, highest first (sklearn's curve points).

    Tied scores fall on the same side of every threshold, so ties form one point of the curve, not several.
    """
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    last_of_tie = np.concatenate([np.flatnonzero(np.diff(ranked)), [len(ranked) - 1]])
    tps = np.cumsum(y_true[order], dtype=np.float64)[last_of_tie]
    fps = 1 + last_of_tie - tps
    return tps, fps


def _roc_points(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from the cumulative counts, with sklearn's first point (0, 0)."""
    # sklearn drops points collinear with their neighbours; that leaves the area as is but changes its rounding.
    if len(fps) > 2:
        corner = np.concatenate([[True], (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), [True]])
        tps, fps = tps[corner], fps[corner]
    with np.errstate(invalid="ignore"):  # 0 / 0 where a class is absent: nan, as sklearn
        return np.concatenate([[0.0], fps]) / fps[-1], np.concatenate([[0.0], tps]) / tps[-1]


def _roc_auc(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    fpr, tpr = _roc_points(tps, fps)
    return float(np.trapezoid(tpr, fpr))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    # sklearn's order of summation: recall decreasing, ending at the point (recall 0, precision 1).
    precision = np.concatenate([precision[::-1], [1.0]])
    recall = np.concatenate([recall[::-1], [0.0]])
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    # Scaling by the largest deviation first keeps the norms from overflowing, as scipy does.
    x_scale, y_scale = np.max(np.abs(xm)), np.max(np.abs(ym))
    x_norm = x_scale * np.linalg.norm(xm / x_scale)
    y_norm = y_scale * np.linalg.norm(ym / y_scale)
    r = np.clip(np.vecdot(xm / x_norm, ym / y_norm), -1.0, 1.0)
    # Two points always lie on a line; scipy rounds away the float error to exactly +-1.
    return float(np.round(r) if len(x) == 2 else r)


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if len(y_true) < 2:
        return float("nan")
    residual = np.sum((y_true - y_pred) ** 2)
    total = np.sum((y_true - np.mean(y_true)) ** 2)
    if residual == 0:
        return 1.0
    if total == 0:
        return 0.0
    return float(1 - residual / total)
