"""The split metrics against scikit-learn / scipy (what the original LaBraM scores with) and hand-computed values."""
import warnings
from typing import Callable

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import pearsonr
from sklearn import metrics as skm

from labram_jax.train.metrics import (
    BINARY_KEYS, MULTICLASS_KEYS, REGRESSION_KEYS, binary_metrics, confusion_matrix, mean_std, multiclass_metrics,
    regression_metrics, roc_curve, task_metrics)

# Loose enough for a future sklearn that sums in another order, far tighter than any real metric difference.
TOL = 1e-12


def _sk_binary(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """pyhealth 1.1.4's binary_metrics_fn, as the original LaBraM calls it."""
    pred = (prob >= 0.5).astype(int)
    return {"accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
            "roc_auc": skm.roc_auc_score(y, prob), "pr_auc": skm.average_precision_score(y, prob)}


def _sk_multiclass(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """pyhealth 1.1.4's multiclass_metrics_fn, as the original LaBraM calls it."""
    pred = np.argmax(logits, axis=1)
    return {"accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
            "cohen_kappa": skm.cohen_kappa_score(y, pred), "f1_weighted": skm.f1_score(y, pred, average="weighted")}


def _assert_close(ours: dict[str, float], ref: dict[str, float]) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=TOL, atol=TOL, equal_nan=True, err_msg=key)


def _binary_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 300))
    y = (rng.random(n) < rng.uniform(0.02, 0.98)).astype(np.int64)
    logits = rng.normal(size=n) * rng.uniform(0.1, 5) + y * rng.uniform(-1, 3)
    # Coarse rounding produces the tied scores that decide how sklearn's curves step.
    decimals = int(rng.integers(0, 4))
    return y, np.round(logits, decimals) if decimals < 3 else logits


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_binary_matches_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        y, logits = _binary_case(rng)
        _assert_close(binary_metrics(y, logits), _sk_binary(y, expit(logits)))
        prob = np.round(expit(logits), 2)
        _assert_close(binary_metrics(y, prob, from_logits=False), _sk_binary(y, prob))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_roc_curve_and_confusion_matrix_match_sklearn_on_random_cases() -> None:
    """The curve `labram plot` draws is the one roc_auc integrates: sklearn's points, ties and one class included."""
    rng = np.random.default_rng(3)
    for _ in range(150):
        y, logits = _binary_case(rng)
        fpr, tpr, _ = skm.roc_curve(y, expit(logits))
        ours = roc_curve(y, logits)
        np.testing.assert_allclose(ours[0], fpr, rtol=0, atol=TOL, equal_nan=True)
        np.testing.assert_allclose(ours[1], tpr, rtol=0, atol=TOL, equal_nan=True)
        np.testing.assert_array_equal(confusion_matrix("binary", y, logits),
                                      skm.confusion_matrix(y, (expit(logits) >= 0.5).astype(int), labels=[0, 1]))
    y = rng.integers(0, 4, 50)
    logits = rng.normal(size=(50, 4))
    np.testing.assert_array_equal(confusion_matrix("multiclass", y, logits),
                                  skm.confusion_matrix(y, logits.argmax(1), labels=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match="regression"):
        confusion_matrix("regression", y, logits)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_multiclass_matches_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(1)
    for _ in range(150):
        num_classes = int(rng.integers(2, 7))
        n = int(rng.integers(1, 200))
        # Skewed class priors leave some classes out of y_true, the predictions, or both.
        y = rng.choice(num_classes, size=n, p=rng.dirichlet(np.full(num_classes, 0.5)))
        logits = rng.normal(size=(n, num_classes)) + 2 * rng.random() * np.eye(num_classes)[y]
        # Small integer logits tie for the argmax, which then takes the first class.
        logits = np.round(logits) if rng.random() < 0.3 else logits
        _assert_close(multiclass_metrics(y, logits), _sk_multiclass(y, logits))


def test_regression_matches_scipy_and_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(2, 200))
        y = rng.normal(size=n) * rng.uniform(0.1, 100)
        pred = rng.uniform(-1, 1) * y + rng.normal(size=n) * rng.uniform(0.01, 50)
        ref = {"pearson_r": pearsonr(y, pred).statistic, "r2": skm.r2_score(y, pred)}
        _assert_close(regression_metrics(y, pred), ref)


def test_binary_by_hand() -> None:
    # Ranking pairs (positive, negative): (.9,.9) ties and counts 1/2, (.9,.1) 1, (.2,.9) 0, (.2,.1) 1.
    # Precision at recall 1/2 is 1/2, at recall 1 it is 2/3: the step sum gives 0.25 + 1/3, a trapezoid would not.
    ours = binary_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.9, 0.2, 0.1]), from_logits=False)
    assert ours == pytest.approx({"accuracy": 0.5, "balanced_accuracy": 0.5, "roc_auc": 0.625, "pr_auc": 7 / 12})
    # Logit 0 is probability 0.5, which the threshold counts as positive.
    ours = binary_metrics(np.array([[0], [1], [1]]), np.array([[0.0], [0.0], [-1.0]]))
    assert ours == pytest.approx({"accuracy": 1 / 3, "balanced_accuracy": 0.25, "roc_auc": 0.25, "pr_auc": 7 / 12})


def test_multiclass_by_hand() -> None:
    # Class 2 is never predicted. Recalls 1/2, 1, 0; F1 2/5, 4/5, 0 with two samples each;
    # observed agreement 1/2, chance agreement (2*3 + 2*3 + 2*0) / 36 = 1/3.
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 0, 0]]
    assert multiclass_metrics(y, logits) == pytest.approx(
        {"accuracy": 0.5, "balanced_accuracy": 0.5, "cohen_kappa": 0.25, "f1_weighted": 0.4})
    # Class 2 is predicted but absent from y_true, so it has no recall to average.
    assert multiclass_metrics(np.array([0, 0, 1]), np.eye(3)[[0, 2, 1]])["balanced_accuracy"] == pytest.approx(0.75)


def test_regression_by_hand() -> None:
    ours = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([[2.0], [4.0], [6.0]]))
    assert ours == pytest.approx({"pearson_r": 1.0, "r2": 1 - 14 / 2})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("label", [0, 1])
def test_binary_with_one_class(label: int) -> None:
    y = np.full(5, label)
    scores = np.linspace(-2, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = binary_metrics(y, scores)
    assert np.isnan(ours["roc_auc"])
    _assert_close(ours, _sk_binary(y, expit(scores)))


def test_undefined_values_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(multiclass_metrics(np.array([1, 1]), np.array([[0.0, 1.0], [0.0, 2.0]]))["cohen_kappa"])
        constant = regression_metrics(np.ones(4), np.arange(4.0))
        single = regression_metrics(np.ones(1), np.ones(1))
    assert np.isnan(constant["pearson_r"]) and np.isnan(single["pearson_r"]) and np.isnan(single["r2"])
    # sklearn's force_finite convention for a constant target.
    assert constant["r2"] == 0.0
    assert regression_metrics(np.ones(4), np.ones(4))["r2"] == 1.0


@pytest.mark.parametrize("call", [
    lambda: binary_metrics(np.array([]), np.array([])),
    lambda: multiclass_metrics(np.array([]), np.zeros((0, 6))),
    lambda: regression_metrics(np.array([]), np.array([])),
    lambda: binary_metrics(np.array([0, 1]), np.array([0.3])),
    lambda: binary_metrics(np.array([0, 2]), np.array([0.3, 0.1])),
    lambda: binary_metrics(np.array([0, 1]), np.array([0.3, np.nan])),
    lambda: multiclass_metrics(np.array([0, 6]), np.zeros((2, 6))),
    lambda: multiclass_metrics(np.array([0, 0.5]), np.zeros((2, 6))),
    lambda: multiclass_metrics(np.array([0, 1]), np.zeros(2)),
    lambda: regression_metrics(np.array([1.0, 2.0]), np.array([1.0, np.inf])),
    lambda: task_metrics("ranking", np.array([0, 1]), np.array([0.3, 0.1])),  # type: ignore[arg-type]
    lambda: mean_std([]),
    lambda: mean_std([{"accuracy": 0.5}, {"roc_auc": 0.5}]),
])
def test_invalid_inputs_raise(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_task_metrics_keys() -> None:
    y = np.array([0, 1, 1, 0])
    assert tuple(task_metrics("binary", y, np.array([-1.0, 2.0, 0.5, 0.1]))) == BINARY_KEYS
    assert tuple(task_metrics("multiclass", y, np.eye(2)[[0, 1, 0, 0]])) == MULTICLASS_KEYS
    assert tuple(task_metrics("regression", y, np.array([0.1, 0.8, 1.2, 0.3]))) == REGRESSION_KEYS


def test_mean_std_is_population_std() -> None:
    runs = [{"accuracy": 0.8, "cohen_kappa": 0.5}, {"accuracy": 0.6, "cohen_kappa": float("nan")}]
    summary = mean_std(runs)
    assert summary["accuracy"] == pytest.approx((0.7, 0.1))
    assert np.isnan(summary["cohen_kappa"][0]) and np.isnan(summary["cohen_kappa"][1])
