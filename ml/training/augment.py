"""Augmentation after the coil paper: small rotations, flips, Gaussian noise; nothing that breaks the
spatial pattern (no large rotations, no cut-and-paste). Works on normalized (B, 264, 18) batches.

A flip across the strip must reverse each side on its own (columns 0–8 and 9–17), and swapping the
top and bottom sides keeps the layout; reversing the coil's length turns head into tail, which is
physically plausible. A "small rotation" of a 264 × 18 map is, to the pixel, a shear: each sensor's
column is shifted along the length by a few sections in proportion to its position across the strip.
"""

from __future__ import annotations

import numpy as np

from ml.matrix import N_SENSORS, SENSORS_PER_SIDE

_ACROSS = np.r_[np.arange(SENSORS_PER_SIDE)[::-1], np.arange(SENSORS_PER_SIDE, N_SENSORS)[::-1]]
_SIDES = np.r_[np.arange(SENSORS_PER_SIDE, N_SENSORS), np.arange(SENSORS_PER_SIDE)]


def augment_batch(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    p_flip: float = 0.5,
    max_shear_sections: int = 3,
    noise_sigma: float = 0.01,
) -> np.ndarray:
    """A randomly augmented copy of ``x`` (B, 264, 18); each transform applied per coil with its own draw."""
    x = np.array(x, dtype=np.float32, copy=True)
    n = len(x)
    flip_across = rng.random(n) < p_flip
    x[flip_across] = x[flip_across][:, :, _ACROSS]
    swap_sides = rng.random(n) < p_flip
    x[swap_sides] = x[swap_sides][:, :, _SIDES]
    flip_length = rng.random(n) < p_flip
    x[flip_length] = x[flip_length][:, ::-1, :]
    if max_shear_sections > 0:
        shear = rng.integers(-max_shear_sections, max_shear_sections + 1, size=n)
        for i in np.flatnonzero(shear):
            x[i] = _shear(x[i], int(shear[i]))
    if noise_sigma > 0:
        x += rng.normal(0.0, noise_sigma, size=x.shape).astype(np.float32)
        np.clip(x, 0.0, 1.0, out=x)
    return x


def _shear(matrix: np.ndarray, sections: int) -> np.ndarray:
    """Shift column j along the length by round(sections · j / 17), padding with the edge rows."""
    out = np.empty_like(matrix)
    length = matrix.shape[0]
    for j in range(matrix.shape[1]):
        s = round(sections * j / (matrix.shape[1] - 1))
        idx = np.clip(np.arange(length) - s, 0, length - 1)
        out[:, j] = matrix[idx, j]
    return out
