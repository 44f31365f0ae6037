"""Augmentation after the coil paper: small rotations, flips, Gaussian noise; nothing that breaks the
spatial pattern (no large rotations, no cut-and-paste). Works on normalized (B, 264, 18) batches.

Beyond the paper, a per-sensor gain error: X-ray gauges creep off calibration between checks, and a
gauge reading 5 % low draws a full-length "thin stripe" that is not on the strip. Labels follow the true
coating, so a coil drawn with a gain error keeps its label and the network learns that a whole sensor a
few per cent off is not a defect, while a thin run along the coil still is.

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
    gain_sigma: float = 0.0,
    zero: float = 0.0,
) -> np.ndarray:
    """A randomly augmented copy of ``x`` (B, 264, 18); each transform applied per coil with its own draw.

    ``gain_sigma`` is the standard deviation of each sensor's relative gain error (drawn per coil, cut at
    2.5 sd); ``zero`` is where 0 g/m² lies on the normalized scale, so that the gain scales the coating and
    not the normalization's offset.
    """
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
    if gain_sigma > 0:
        limit = 2.5 * gain_sigma
        gain = 1.0 + np.clip(rng.normal(0.0, gain_sigma, size=(n, 1, N_SENSORS)), -limit, limit)
        x = (zero + (x - zero) * gain).astype(np.float32)
    if noise_sigma > 0:
        x += rng.normal(0.0, noise_sigma, size=x.shape).astype(np.float32)
    if gain_sigma > 0 or noise_sigma > 0:
        np.clip(x, 0.0, 1.0, out=x)
    return x


def _shear(matrix: np.ndarray, sections: int) -> np.ndarray:
    """Shift each column along the length in proportion to its position across the strip, padding with the
    edge rows: the operator-side sensor moves 0 sections, the drive-side one ``sections``.

    The position is the sensor's place on its own side (``j % 9``), not its column: columns 9–17 measure
    the bottom side at the same places across the strip as columns 0–8 do the top, so a rotation of the
    strip moves both sides alike and a defect through the coating of both sides stays in line."""
    out = np.empty_like(matrix)
    length = matrix.shape[0]
    for j in range(matrix.shape[1]):
        idx = np.clip(np.arange(length) - _shear_offset(sections, j), 0, length - 1)
        out[:, j] = matrix[idx, j]
    return out


def _shear_offset(sections: int, column: int) -> int:
    """How many sections a shear of ``sections`` moves ``column`` along the coil (same for top and bottom)."""
    return round(sections * (column % SENSORS_PER_SIDE) / (SENSORS_PER_SIDE - 1))
