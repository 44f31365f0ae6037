"""The coil matrix: 264 sections along the coil × 18 sensors (0–8 top, 9–17 bottom, operator → drive side)."""

from __future__ import annotations

import numpy as np

N_SECTIONS = 264
N_SENSORS = 18
SENSORS_PER_SIDE = 9
SHAPE = (N_SECTIONS, N_SENSORS)
MATRIX_BYTES = N_SECTIONS * N_SENSORS * 4  # one coil's readings as float32
TOP = slice(0, SENSORS_PER_SIDE)
BOTTOM = slice(SENSORS_PER_SIDE, N_SENSORS)
# Sensors nearest the strip edges on each side (operator side, drive side).
EDGE_SENSORS = (0, 8, 9, 17)
CENTRE_SENSORS = (3, 4, 5, 12, 13, 14)


def as_matrix_batch(X: np.ndarray) -> np.ndarray:
    """Return ``X`` as float32 (N, 264, 18), accepting a single matrix too; NaN marks a dropped reading."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 2:
        X = X[None]
    if X.shape[1:] != SHAPE:
        raise ValueError(f"expected (N, {N_SECTIONS}, {N_SENSORS}) matrices, got {X.shape}")
    return X
