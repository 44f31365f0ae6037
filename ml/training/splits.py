"""Train/validation splits that keep the tiny NOK share in both parts."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each class split at ``val_fraction`` with at least one coil of it in val
    when the class has two or more, so early stopping and calibration always see some NOK."""
    y = np.asarray(y)
    train, val = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_val = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
