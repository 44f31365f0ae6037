"""Binary OK/NOK metrics with NOK as the positive class, as the coil paper reports them."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def binary_metrics(y_true: np.ndarray, p_nok: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """NOK precision/recall/F1, OK F1, macro-F1, accuracy, ROC-AUC, MCC and the confusion matrix."""
    y_true = np.asarray(y_true).astype(int)
    p_nok = np.asarray(p_nok, dtype=float)
    y_pred = (p_nok >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1], zero_division=0)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "n": len(y_true),
        "n_nok": int(y_true.sum()),
        "precision_nok": float(precision[1]),
        "recall_nok": float(recall[1]),
        "f1_nok": float(f1[1]),
        "f1_ok": float(f1[0]),
        "macro_f1": float((f1[0] + f1[1]) / 2),
        "accuracy": float((tp + tn) / max(len(y_true), 1)),
        "roc_auc": float(roc_auc_score(y_true, p_nok)) if both_classes else None,
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if both_classes else 0.0,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def cost_accuracy(confusion: dict[str, int], nok_cost: float) -> float:
    """Accuracy with each NOK coil counting ``nok_cost`` times: 1 − (``nok_cost`` · missed NOK + false alarms) /
    (``nok_cost`` · NOK + OK); 1 when every coil is right, 0 when every coil is wrong.

    Why not plain accuracy where there are too few NOK coils for NOK-F1: with a few percent NOK, a model that
    calls everything OK is then the most accurate (4 NOK in 100 coils: 0.96, against 0.95 for one that finds all
    four with five false alarms). This weighs a miss as the class weights and :func:`cost_threshold` do."""
    fn, fp = confusion["fn"], confusion["fp"]
    total = nok_cost * (confusion["tp"] + fn) + confusion["tn"] + fp
    return float(1 - (nok_cost * fn + fp) / total) if total else 1.0


def f1_nok(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    tp = np.sum(y_true & y_pred)
    denominator = 2 * tp + np.sum(~y_true & y_pred) + np.sum(y_true & ~y_pred)
    return float(2 * tp / denominator) if denominator else 0.0


def best_threshold(y_true: np.ndarray, scores: np.ndarray, *, low: float = 0.05, high: float = 0.95) -> float:
    """The score threshold in [low, high] that maximizes NOK-F1; among ties, the one nearest 0.5.

    Bounded so that a tiny validation split cannot push the model to flag everything or nothing.
    """
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=float)
    if y_true.sum() == 0 or (~y_true).sum() == 0:
        return 0.5
    candidates = _threshold_candidates(scores, low, high)
    return _nearest_half(candidates, np.array([f1_nok(y_true, scores >= t) for t in candidates]))


def cost_threshold(
    y_true: np.ndarray, scores: np.ndarray, *, nok_cost: float, low: float = 0.05, high: float = 0.95
) -> float:
    """The score threshold in [low, high] with the lowest cost ``nok_cost`` · missed NOK + false alarms;
    among ties, the one nearest 0.5.

    Why not the F1 optimum: on a validation split with a few percent NOK (a dozen or two coils), the F1
    optimum often sits on one or two coils at the top of the score range (thresholds of 0.94 were seen) and
    the model then misses most NOK coils of a later period. The cost rule is the decision the class weights
    already state (a missed NOK coil costs as much as ``nok_cost`` false alarms an operator clears).
    """
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=float)
    if y_true.sum() == 0 or (~y_true).sum() == 0:
        return 0.5
    candidates = _threshold_candidates(scores, low, high)
    cost = np.array([nok_cost * (y_true & (scores < t)).sum() + (~y_true & (scores >= t)).sum() for t in candidates])
    return _nearest_half(candidates, -cost)


def _threshold_candidates(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    candidates = np.unique(np.clip(np.r_[scores, 0.5], low, high))
    # midpoints between neighbouring scores generalize better than the scores themselves
    mids = (candidates[:-1] + candidates[1:]) / 2 if len(candidates) > 1 else candidates
    return np.unique(np.r_[mids, 0.5])


def _nearest_half(candidates: np.ndarray, gain: np.ndarray) -> float:
    """The candidate with the highest gain; among ties, the one nearest 0.5."""
    tied = candidates[np.isclose(gain, gain.max())]
    return float(tied[np.argmin(np.abs(tied - 0.5))])


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximizing Youden's J = TPR − FPR (the anomaly paper's rule)."""
    truth = np.asarray(truth).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.all() or not truth.any():
        return float(np.quantile(scores, 0.99))
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], scores.max()))
