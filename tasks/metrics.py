"""Evaluation metrics: pure functions over labels and predicted probabilities.

Everything here takes numpy arrays (``y_true`` as class indices ``0..K-1``, ``probs`` as an
``N x K`` matrix whose rows sum to 1) and returns plain Python values, so the evaluate stage can
write one dict to ``reports/metrics.json`` and log that same dict to MLflow. No TensorFlow and no
matplotlib here (the served model imports this module; the plots are in ``tasks.plots``).

Undefined figures (a recall with no positives, an interval from resamples that never contain a
positive) are ``nan``; ``json.dumps`` writes them as ``NaN``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tasks.decision import called_levels
from tasks.schema import RISK_LEVELS, risk_level_of

# Rows of a softmax in float32 sum to 1 within ~1e-6; anything further off is not probabilities.
_ROW_SUM_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# Input checks


def _labels(y_true: np.ndarray, n_classes: int | None = None, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if n_classes is not None and y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1} (min {y.min()}, max {y.max()})")
    return y.astype(np.int64, copy=False)


def _probabilities(probs: np.ndarray) -> np.ndarray:
    """Check an N x K probability matrix and return it as float64 with rows renormalised."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be an N x K matrix with K >= 2, got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("no cases: probs and y_true are empty")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"probs rows must sum to 1; row {bad[0]} sums to {sums[bad[0]]:.6f} "
            f"({bad.size} rows off). Pass softmax outputs, not logits."
        )
    # Renormalise away float32 rounding so downstream checks (sklearn's log_loss) stay quiet.
    return p / sums[:, None]


def _labels_and_probabilities(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _probabilities(probs)
    y = _labels(y_true, n_classes=p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    return y, p


# ---------------------------------------------------------------------------------------------
# Risk levels


def risk_probabilities(
    probs: np.ndarray,
    target: str,
    diagnoses: Sequence[str],
    risk_map: Mapping[str, Sequence[str]],
) -> np.ndarray:
    """Probabilities per risk level (columns in ``RISK_LEVELS`` order).

    ``target="risk"``: the model already predicts risk levels; ``probs`` is returned as is.
    ``target="dx"``: ``probs`` is N x len(diagnoses) (columns in ``diagnoses`` order) and each
    risk level's probability is the sum over the diagnoses that ``risk_map`` assigns to it.
    """
    p = np.asarray(probs)
    if target == "risk":
        if p.ndim != 2 or p.shape[1] != len(RISK_LEVELS):
            raise ValueError(
                f"target 'risk' expects N x {len(RISK_LEVELS)} probabilities "
                f"({', '.join(RISK_LEVELS)}), got shape {p.shape}"
            )
        return p
    if target != "dx":
        raise ValueError(f"unknown target {target!r}; accepted: 'risk', 'dx'")

    diagnoses = list(diagnoses)
    if p.ndim != 2 or p.shape[1] != len(diagnoses):
        raise ValueError(
            f"target 'dx' expects N x {len(diagnoses)} probabilities (one column per diagnosis "
            f"{diagnoses}), got shape {p.shape}"
        )
    level_of = risk_level_of(risk_map, diagnoses)
    # Diagnosis -> level as a 0/1 matrix: one matmul sums each level's diagnoses.
    assignment = np.array([[level_of[dx] == level for level in RISK_LEVELS] for dx in diagnoses], dtype=p.dtype)
    return p @ assignment


# ---------------------------------------------------------------------------------------------
# Calibration


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Top-label reliability per equal-width confidence bin ``(bin_lower, bin_upper]``.

    One row per bin, empty bins included (``count`` 0, ``mean_confidence`` and ``accuracy`` nan).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _labels_and_probabilities(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lower, upper] as in Guo et al. (2017); a confidence of exactly 0 joins bin 0.
    # (sklearn's calibration_curve bins alike but drops empty bins and does not count cases.)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count.astype(np.int64),
            "mean_confidence": mean_confidence,
            "accuracy": accuracy,
        }
    )


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al., 2017) with equal-width bins.

    ``sum_b |accuracy_b - mean_confidence_b| * n_b / N`` over the non-empty bins.
    """
    return curve_ece(reliability_curve(y_true, probs, n_bins))


def curve_ece(curve: pd.DataFrame) -> float:
    """The expected calibration error of a :func:`reliability_curve` (nan when it counts no case)."""
    total = curve["count"].sum()
    if not total:
        return math.nan
    filled = curve[curve["count"] > 0]
    return float(((filled["accuracy"] - filled["mean_confidence"]).abs() * filled["count"]).sum() / total)


# ---------------------------------------------------------------------------------------------
# Triage operating point


def choose_threshold(y_high: np.ndarray, p_high: np.ndarray, target_recall: float) -> float:
    """The highest threshold ``t`` whose referrals ``p_high >= t`` reach ``target_recall``.

    Picking the highest such ``t`` refers as few lesions as possible, so specificity is as high
    as the recall target allows. The answer is always one of the positives' scores.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    y = np.asarray(y_high)
    scores = np.asarray(p_high, dtype=np.float64)
    if y.ndim != 1 or scores.shape != y.shape:
        raise ValueError(f"y_high and p_high must be 1-D arrays of the same length, got {y.shape} and {scores.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_high must be binary (1 = high risk, 0 = not)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("p_high must be finite")
    positive_scores = np.sort(scores[y.astype(bool)])[::-1]
    n_positive = positive_scores.size
    if n_positive == 0:
        raise ValueError(
            "cannot choose a threshold: there are no high-risk cases in this split, so recall "
            "is undefined. Choose the threshold on a split that contains high-risk lesions."
        )
    # Need k positives at or above t; the tolerance keeps 2/3 * 3 from becoming 3 positives.
    needed = max(1, math.ceil(target_recall * n_positive - 1e-9))
    return float(positive_scores[needed - 1])


def triage_figures(
    y_risk: np.ndarray,
    p_high: np.ndarray,
    threshold: float,
    high_index: int = 2,
    low_index: int = 0,
) -> dict[str, float]:
    """What referring every lesion with ``p_high >= threshold`` would do.

    ``high_risk_recall``: share of high-risk lesions referred (sensitivity);
    ``specificity``: share of the other lesions not referred; ``referral_rate``: share of all
    lesions referred; ``low_risk_spared``: share of low-risk lesions not referred (the
    biopsies avoided). A figure whose group is empty is nan.
    """
    y = _labels(y_risk, name="y_risk")
    scores = np.asarray(p_high, dtype=np.float64)
    if scores.shape != y.shape:
        raise ValueError(f"y_risk and p_high must have the same length, got {y.shape} and {scores.shape}")
    if y.size == 0:
        raise ValueError("no cases: y_risk and p_high are empty")
    referred = scores >= threshold
    high = y == high_index
    low = y == low_index
    return {
        "high_risk_recall": _mean_or_nan(referred[high]),
        "specificity": _mean_or_nan(~referred[~high]),
        "referral_rate": float(referred.mean()),
        "low_risk_spared": _mean_or_nan(~referred[low]),
        "threshold": float(threshold),
    }


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


# ---------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    y_pred_or_scores: np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(y_true, y_pred_or_scores)``.

    With ``groups`` (lesion ids) whole groups are resampled (cluster bootstrap): images of one
    lesion are correlated, and resampling them one by one would make the interval too narrow.
    Resamples where the metric is nan (e.g. no positives drawn) are left out; if all are, the
    interval is ``(nan, nan)``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y = np.asarray(y_true)
    pred = np.asarray(y_pred_or_scores)
    n = y.shape[0]
    if n == 0:
        raise ValueError("no cases to resample")
    if pred.shape[0] != n:
        raise ValueError(f"y_true has {n} cases but y_pred_or_scores has {pred.shape[0]}")
    # Without groups each case is its own group: the same draws as resampling cases directly.
    group_ids = np.arange(n) if groups is None else np.asarray(groups)
    if group_ids.shape != (n,):
        raise ValueError(f"groups must have one id per case ({n}), got {group_ids.shape}")
    samples = _group_resamples(group_ids, n_resamples, np.random.default_rng(seed))
    statistics = np.array([metric(y[idx], pred[idx]) for idx in samples], dtype=np.float64)
    statistics = statistics[~np.isnan(statistics)]
    if statistics.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def _group_resamples(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield case indices of resamples that draw whole groups with replacement."""
    _, inverse = np.unique(groups, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")  # cases laid out group by group
    sizes = np.bincount(inverse)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    draws = rng.integers(0, sizes.size, size=(n_resamples, sizes.size))
    for drawn in draws:
        drawn_sizes = sizes[drawn]
        out_starts = np.cumsum(drawn_sizes) - drawn_sizes
        # Position j of the output block b maps to starts[drawn[b]] + (j - out_starts[b]).
        shift = np.repeat(starts[drawn] - out_starts, drawn_sizes)
        yield order[np.arange(drawn_sizes.sum()) + shift]


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (as sklearn), fast enough to resample."""
    n_classes = int(max(y_true.max(), y_pred.max())) + 1
    support = np.bincount(y_true, minlength=n_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def class_recall(index: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """Recall of class ``index`` given predicted class indices or referral booleans."""

    def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        positive = y_true == index
        if not positive.any():
            return math.nan
        hit = y_pred[positive]
        hit = hit if hit.dtype == bool else hit == index
        return float(hit.mean())

    return recall


# ---------------------------------------------------------------------------------------------
# The metrics dict


def high_risk_auc(y_high: np.ndarray, p_high: np.ndarray) -> float:
    """ROC-AUC of P(high) for high risk against the rest; nan when either group is empty."""
    positives = int(np.sum(y_high))
    if positives == 0 or positives == len(y_high):
        return math.nan
    return float(roc_auc_score(y_high, p_high))


def operating_point_name(target_recall: float) -> str:
    """The key of an operating point in metrics.json, e.g. ``recall_0.90``."""
    return f"recall_{target_recall:.2f}"


def classification_figures(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    groups: np.ndarray | None = None,
    threshold: float | None = None,
    operating_points: Mapping[str, float] | None = None,
    high_index: int = 2,
    low_index: int = 0,
    n_resamples: int = 1000,
    seed: int = 0,
    prior: np.ndarray | None = None,
    calibration_bins: int = 15,
) -> dict[str, Any]:
    """All evaluation figures as one JSON-serialisable dict (plain floats, ints, lists, dicts).

    The called classes are :func:`tasks.decision.called_levels` of ``probs`` and the training
    ``prior`` (the plain argmax without one). Keys: ``n_cases``, ``accuracy``, ``loss`` (log
    loss), ``balanced_accuracy`` and its ``balanced_accuracy_ci95`` (cluster bootstrap over
    ``groups`` when given), ``macro_f1`` (over the classes present in ``y_true`` or the
    predictions), ``per_class`` (precision, recall, f1, support by class name), ``confusion_matrix``
    (rows true, columns predicted), ``roc_auc_ovr`` (macro one-vs-rest) and ``roc_auc_per_class``,
    ``ece`` (over ``calibration_bins`` equal-width bins), ``high_risk_recall`` (of the called
    classes). A class absent from ``y_true`` (or making up all of it) has no defined AUC and is
    left out of ``roc_auc_per_class`` and the macro average.

    The triage figures come first: ``high_risk_roc_auc`` (P(high), high risk against the rest)
    with its ``high_risk_roc_auc_ci95`` and ``high_risk_pr_auc`` (average precision). The macro
    one-vs-rest AUC is lifted by the easy moderate class and is never the headline.

    With ``threshold``, ``triage`` holds :func:`triage_figures` for referring
    ``probs[:, high_index] >= threshold`` plus ``high_risk_recall_ci95`` at that operating point;
    ``operating_points`` (name -> threshold) adds the same figures per named point.
    """
    y, p = _labels_and_probabilities(y_true, probs)
    names = [str(name) for name in class_names]
    n_classes = p.shape[1]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class_names for {n_classes} probability columns")
    for name, index in (("high_index", high_index), ("low_index", low_index)):
        if not 0 <= index < n_classes:
            raise ValueError(f"{name} {index} is outside 0..{n_classes - 1}")
    labels = list(range(n_classes))
    y_pred = called_levels(p, prior)

    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    present = np.union1d(y, y_pred).tolist()
    auc_per_class: dict[str, float] = {}
    for k in labels:
        positive = y == k
        if 0 < positive.sum() < positive.size:
            auc_per_class[names[k]] = float(roc_auc_score(positive, p[:, k]))

    y_high, p_high = y == high_index, p[:, high_index]
    boot = {"n_resamples": n_resamples, "seed": seed, "groups": groups}
    figures: dict[str, Any] = {
        "high_risk_roc_auc": high_risk_auc(y_high, p_high),
        "high_risk_roc_auc_ci95": list(bootstrap_interval(high_risk_auc, y_high, p_high, **boot)),
        "high_risk_pr_auc": float(average_precision_score(y_high, p_high)) if y_high.any() else math.nan,
        "n_cases": int(y.size),
        "accuracy": float(np.mean(y_pred == y)),
        "loss": float(log_loss(y, p, labels=labels)),
        "balanced_accuracy": _balanced_accuracy(y, y_pred),
        "balanced_accuracy_ci95": list(bootstrap_interval(_balanced_accuracy, y, y_pred, **boot)),
        "macro_f1": float(f1_score(y, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": {
            names[k]: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k in labels
        },
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).astype(int).tolist(),
        "roc_auc_ovr": float(np.mean(list(auc_per_class.values()))) if auc_per_class else math.nan,
        "roc_auc_per_class": auc_per_class,
        "ece": expected_calibration_error(y, p, calibration_bins),
        "high_risk_recall": class_recall(high_index)(y, y_pred),
    }

    def at(point: float) -> dict[str, Any]:
        recall_ci = bootstrap_interval(class_recall(high_index), y, p_high >= point, **boot)
        triage = triage_figures(y, p_high, point, high_index=high_index, low_index=low_index)
        return {**triage, "high_risk_recall_ci95": list(recall_ci)}

    if threshold is not None:
        figures["triage"] = at(threshold)
    if operating_points:
        figures["operating_points"] = {name: at(point) for name, point in operating_points.items()}
    return figures


def headline_figures(metrics: dict) -> dict[str, float | None]:
    """The figures a triage user looks at first, in that order: melanoma discrimination, the
    operating point, 3-level balanced accuracy, calibration; the macro averages last."""
    triage = metrics.get("triage") or {}
    return {
        "high_risk_roc_auc": metrics.get("high_risk_roc_auc"),
        "high_risk_pr_auc": metrics.get("high_risk_pr_auc"),
        "high_risk_recall": triage.get("high_risk_recall"),
        "specificity": triage.get("specificity"),
        "low_risk_spared": triage.get("low_risk_spared"),
        "threshold": triage.get("threshold"),
        "balanced_accuracy": metrics.get("balanced_accuracy"),
        "ece": metrics.get("ece"),
        "macro_f1": metrics.get("macro_f1"),
        "roc_auc_ovr": metrics.get("roc_auc_ovr"),
    }
