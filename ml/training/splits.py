"""Train/validation splits that keep the tiny NOK share in both parts."""

from __future__ import annotations

import numpy as np


def stratified_split(
    y: np.ndarray, val_fraction: float, rng: np.random.Generator, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each class split at ``val_fraction`` with at least one coil of it in val
    when the class has two or more, so early stopping and calibration always see some NOK.

    ``groups`` (the coil ids) keeps the rows of one coil on one side: ReTrain repeats every operator-labelled
    coil, and a row-wise split put copies of most of them in both parts, so early stopping and the threshold
    were fitted on coils the network had memorised. Validation then holds each coil once. Without repeats the
    split is the row-wise one, row for row (the same seed gives the same models as before)."""
    y = np.asarray(y)
    if groups is None:
        return _by_class(y, val_fraction, rng)
    ids, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    if len(ids) == len(y):
        return _by_class(y, val_fraction, rng)
    group_y = np.zeros(len(ids), dtype=y.dtype)
    np.maximum.at(group_y, inverse, y)  # a coil is NOK if any of its rows says so (ReTrain's rows agree)
    _, val_groups = _by_class(group_y, val_fraction, rng)
    return np.flatnonzero(~np.isin(inverse, val_groups)), np.sort(first[val_groups])


def _by_class(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_val = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def split_keeping(
    y: np.ndarray,
    val_fraction: float,
    rng: np.random.Generator,
    groups: np.ndarray,
    in_train: np.ndarray,
    in_val: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with some coils' side fixed: rows where ``in_train`` go to training, rows where
    ``in_val`` to validation (each coil once, as in :func:`stratified_split`), and the rest are split by
    :func:`stratified_split`. A model warm-started from another must not be validated on coils the other
    learned from: its validation would reward what the starting weights remember, not what they learned."""
    y, groups = np.asarray(y), np.asarray(groups)
    if np.any(in_train & in_val):
        raise ValueError("a row cannot be kept in both training and validation")
    free = np.flatnonzero(~(in_train | in_val))
    drawn_train, drawn_val = (
        stratified_split(y[free], val_fraction, rng, groups=groups[free]) if len(free) else ([], [])
    )
    kept_val = np.flatnonzero(in_val)
    _, first = np.unique(groups[kept_val], return_index=True)
    val = np.sort(np.concatenate([kept_val[first], free[drawn_val]]).astype(np.int64))
    train = np.sort(np.concatenate([np.flatnonzero(in_train), free[drawn_train]]).astype(np.int64))
    return train, val
