"""How sure are we? Bootstrap intervals and a paired permutation test, as the coil paper reports (§5.5)."""

from __future__ import annotations

import numpy as np

from ml.evaluation.metrics import f1_nok


def bootstrap_f1_interval(
    y: np.ndarray, p: np.ndarray, *, n: int = 2000, level: float = 0.95, seed: int = 0, threshold: float = 0.5
) -> tuple[float, float]:
    """Percentile bootstrap interval of NOK-F1 over coils resampled with replacement."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    tp = np.sum(y[idx] & pred[idx], axis=1)
    fp = np.sum(~y[idx] & pred[idx], axis=1)
    fn = np.sum(y[idx] & ~pred[idx], axis=1)
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(f1, [alpha, 1 - alpha])
    return float(lo), float(hi)


def permutation_test_f1(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, *, n: int = 5000, seed: int = 0, threshold: float = 0.5
) -> tuple[float, float]:
    """Paired two-sided test of "A and B have the same NOK-F1": swap A's and B's verdict on random coils.

    Returns (observed F1(A) − F1(B), p-value).
    """
    y = np.asarray(y).astype(bool)
    a = np.asarray(p_a) >= threshold
    b = np.asarray(p_b) >= threshold
    observed = f1_nok(y, a) - f1_nok(y, b)
    rng = np.random.default_rng(seed)
    swap = rng.random((n, len(y))) < 0.5
    pa = np.where(swap, b, a)
    pb = np.where(swap, a, b)

    def f1_rows(pred: np.ndarray) -> np.ndarray:
        tp = np.sum(y & pred, axis=1)
        denominator = 2 * tp + np.sum(~y & pred, axis=1) + np.sum(y & ~pred, axis=1)
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)

    differences = f1_rows(pa) - f1_rows(pb)
    p_value = (1 + np.sum(np.abs(differences) >= abs(observed) - 1e-12)) / (n + 1)
    return float(observed), float(p_value)
