"""Statistics of coil matrices that show what each drift scenario moves (used by tests and the bench).

All of them work on measured matrices ``X`` (N, 264, 18) with NaN for dropped readings, i.e. on
what a monitoring dashboard could compute without the simulator's ground truth; only
:func:`nok_share` reads the labels.
"""

from __future__ import annotations

import warnings

import numpy as np

from ml.dataset import CoilDataset
from ml.drift import BODY
from ml.matrix import CENTRE_SENSORS, EDGE_SENSORS, SENSORS_PER_SIDE, as_matrix_batch
from ml.recalibration import sensor_levels
from ml.recalibration import sensor_offsets as sensor_offsets  # re-exported: the bench and tests read it here


def _nanmedian(a: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, which is what we want
        return np.nanmedian(a, axis=axis)


def edge_centre_ratio(X: np.ndarray) -> np.ndarray:
    """(N,) mean body level of the edge sensors over the mean of the centre sensors (>1: edge build-up)."""
    lv = sensor_levels(X)
    return np.nanmean(lv[:, list(EDGE_SENSORS)], axis=1) / np.nanmean(lv[:, list(CENTRE_SENSORS)], axis=1)


def apparent_stripe(X: np.ndarray, depth: float = 0.15, run: int = 3) -> np.ndarray:
    """(N,) bool: some sensor reads ``depth`` below its side's row median for ``run`` body rows in a row.

    What a naive "thin stripe" alarm would flag, real or not.
    """
    X = as_matrix_batch(X)[:, BODY]
    rows = np.concatenate(
        [
            np.repeat(_nanmedian(X[..., :SENSORS_PER_SIDE], axis=2)[..., None], SENSORS_PER_SIDE, 2),
            np.repeat(_nanmedian(X[..., SENSORS_PER_SIDE:], axis=2)[..., None], SENSORS_PER_SIDE, 2),
        ],
        axis=2,
    )
    low = rows * (1.0 - depth) > X
    return _has_run(low, run, axis=1).any(axis=1)


def transverse_band(X: np.ndarray, depth: float = 0.08, run: int = 2) -> np.ndarray:
    """(N,) bool: one side's whole width reads ``depth`` below that side's coil median for ``run`` body rows.

    Head and tail transients are outside the body and hit both sides; a pressure surge on one knife
    is a one-sided, full-width, short band in the middle of the coil.
    """
    X = as_matrix_batch(X)[:, BODY]
    flags = []
    for side in (slice(0, SENSORS_PER_SIDE), slice(SENSORS_PER_SIDE, 2 * SENSORS_PER_SIDE)):
        row = _nanmedian(X[..., side], axis=2)  # (N, rows)
        ref = _nanmedian(row, axis=1)[:, None]
        flags.append(_has_run(row < ref * (1.0 - depth), run, axis=1))
    return flags[0] | flags[1]


def _has_run(mask: np.ndarray, run: int, axis: int) -> np.ndarray:
    """Whether ``mask`` holds ``run`` consecutive True values along ``axis`` (that axis is reduced)."""
    m = np.moveaxis(mask, axis, -1).astype(np.int16)
    c = np.cumsum(m, axis=-1)
    c = np.concatenate([np.zeros((*c.shape[:-1], 1), c.dtype), c], axis=-1)
    window = c[..., run:] - c[..., :-run]
    return (window >= run).any(axis=-1)


def coating_share(ds: CoilDataset, coating: str) -> float:
    return float(np.mean(ds.column("coating") == coating)) if len(ds) else float("nan")


def nok_share(ds: CoilDataset) -> tuple[float, float]:
    """(operator-label NOK share, true NOK share)."""
    return float(ds.y.mean()), float(ds.column("y_true").astype(float).mean())
