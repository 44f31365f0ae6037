"""Coil features for drift monitoring: numbers a quality engineer can read off a coil matrix.

A drift report compares the distribution of these features over recent coils with their distribution
over the data the serving models were trained on. Every feature is computed from the measured matrix
alone (no labels, no model), over the coil *body*: the first and last ``TRIM`` sections carry the
head and tail transients that the shear cuts off and that the label rule ignores.

Per-sensor features are *relative to the coil's own side* (the median of its side's 9 sensors), so that
they do not move with the product: a Z100 and a Z275 coil have the same profile, and a day with more
thin-coated orders is not a drifted gauge. The coating level itself is one feature of its own.

Per sensor ``k`` (``s00`` … ``s17``; 0–8 top side, 9–17 bottom side, operator side → drive side):

``sKK_mean``
    mean over the body, in per cent above (+) or below (−) its side's median sensor. A gauge off
    calibration sits off by its gain error on every coil; the lip profile and edge build-up give
    each sensor a small, stable offset.
``sKK_spread``
    standard deviation along the body over the median standard deviation of its side's sensors
    (1 = as noisy as its neighbours): a noisy, sticking or drifting gauge, not the controller's
    wander, which all sensors of a side share.
``sKK_min``
    the thinnest ``RUN``-section stretch, in per cent relative to its side's median (each stretch
    counted at its least thin section, as the label rule judges a thin run): one low reading does
    not move it; a clogged knife does.

Per coil:

``coating``
    mean coating over the body, g/m²: the product mix (and a line running generally thin or thick).
``worst_section``
    depth of the coil's thinnest stretch below its side's median, in per cent (0 = no thin spot;
    15 = some sensor reads 15 % below the rest for ``RUN`` sections in a row): the defect signal.
``worst_section_at``
    where that stretch lies along the body, 0 (head) … 1 (tail).
``edge_centre_ratio``
    mean of the edge sensors over mean of the centre sensors (> 1: the usual edge build-up; < 1:
    worn knife lips).
``top_bottom_balance``
    top-side mean over bottom-side mean (1 = both knives lay the same coating).

Dropped readings (NaN) are ignored; a sensor dropped over the whole body gives NaN features.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ml.matrix import CENTRE_SENSORS, EDGE_SENSORS, N_SECTIONS, N_SENSORS, SENSORS_PER_SIDE, as_matrix_batch

TRIM = 12  # sections cut at head and tail
RUN = 3  # sections of a thin stretch
BODY = slice(TRIM, N_SECTIONS - TRIM)

SENSOR_FEATURES = ("mean", "spread", "min")
COIL_FEATURES = ("coating", "worst_section", "worst_section_at", "edge_centre_ratio", "top_bottom_balance")


def sensor_column(sensor: int, feature: str) -> str:
    return f"s{sensor:02d}_{feature}"


FEATURE_NAMES: tuple[str, ...] = (
    *(sensor_column(k, f) for f in SENSOR_FEATURES for k in range(N_SENSORS)),
    *COIL_FEATURES,
)


def sensor_of(column: str) -> int | None:
    """The sensor a feature column belongs to (``s03_mean`` → 3), or None for a coil-level feature."""
    head, _, _ = column.partition("_")
    if len(head) == 3 and head[0] == "s" and head[1:].isdigit():
        return int(head[1:])
    return None


def _left_out(values: np.ndarray, sensors: list[int]) -> np.ndarray:
    """``values`` (N, 18) with ``sensors``' columns unknown, for a side level taken without them."""
    if not sensors:
        return values
    values = values.copy()
    values[:, sensors] = np.nan
    return values


def _thinnest_runs(X: np.ndarray, run: int) -> np.ndarray:
    """(N, rows − run + 1, sensors): the *thickest* reading of every ``run`` consecutive sections.

    A stretch is as thin as its least thin section (the label rule's "thin for ``run`` sections in a
    row"), so one low reading — a spike, a burst — cannot make a stretch look thin.
    """
    return np.nanmax(sliding_window_view(X, run, axis=1), axis=-1)


def per_side(values: np.ndarray, reduce) -> np.ndarray:
    """(N, 18) → (N, 18): ``reduce`` over each side's sensors, repeated across that side."""
    top = reduce(values[:, :SENSORS_PER_SIDE], axis=1, keepdims=True)
    bottom = reduce(values[:, SENSORS_PER_SIDE:], axis=1, keepdims=True)
    return np.concatenate([np.repeat(top, SENSORS_PER_SIDE, 1), np.repeat(bottom, SENSORS_PER_SIDE, 1)], axis=1)


def silent_sensors(X: np.ndarray, share: float = 0.5) -> frozenset[int]:
    """Sensors with no reading over the body on at least ``share`` of the coils of ``X``: a dead gauge."""
    if len(X) == 0:
        return frozenset()
    read = np.isfinite(as_matrix_batch(X)[:, BODY]).any(axis=1)  # (N, 18)
    return frozenset(int(k) for k in np.flatnonzero((~read).mean(axis=0) >= share))


def left_out(*samples: np.ndarray) -> frozenset[int]:
    """The sensors a comparison of ``samples`` leaves out of its side levels: those silent in any of them, but for
    a side silent as a whole in a sample (its features there are unknown either way, and the other sample's must
    stay what they are, to say so)."""
    sides = (frozenset(range(SENSORS_PER_SIDE)), frozenset(range(SENSORS_PER_SIDE, N_SENSORS)))
    dropped: set[int] = set()
    for X in samples:
        silent = silent_sensors(X)
        dropped |= silent.difference(*(side for side in sides if side <= silent))
    return frozenset(dropped)


def coil_features(X: np.ndarray, without: Collection[int] = ()) -> dict[str, np.ndarray]:
    """Every feature of :data:`FEATURE_NAMES` for each coil of ``X`` (N, 264, 18): name → (N,) float64.

    A side's level (what its sensors are measured against) is its median sensor, leaving out the sensors in
    ``without``, and so are the coil-level features. A drift comparison leaves out, on both sides, the sensors
    dead in either (:func:`silent_sensors`): the median of the other eight is another sensor's reading, which
    moves every feature of the side by part of the lip profile's few per cent, and a test over a day of coils
    then blamed seven healthy gauges (and the coating level, the balances and the worst section moved too)."""
    body = as_matrix_batch(X)[:, BODY].astype(np.float64)
    ignored = sorted(without)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN sensors give NaN, which is what we want
        mean = np.nanmean(body, axis=1)  # (N, 18)
        spread = np.nanstd(body, axis=1)
        runs = _thinnest_runs(body, RUN)  # (N, rows, 18)
        low = np.nanmin(runs, axis=1)
        kept = _left_out(mean, ignored)  # what the coil-level features are taken over
        side_median = per_side(kept, np.nanmedian)
        depth = 1.0 - runs / side_median[:, None, :]  # (N, rows, 18): how far below its side
        depth[:, :, ignored] = np.nan
        flat = np.where(np.isnan(depth), -np.inf, depth).reshape(len(depth), -1)
        worst = flat.argmax(axis=1)
        worst_depth = flat[np.arange(len(flat)), worst]
        worst_row = worst // N_SENSORS
        edge = np.nanmean(kept[:, list(EDGE_SENSORS)], axis=1)
        centre = np.nanmean(kept[:, list(CENTRE_SENSORS)], axis=1)
        top = np.nanmean(kept[:, :SENSORS_PER_SIDE], axis=1)
        bottom = np.nanmean(kept[:, SENSORS_PER_SIDE:], axis=1)
    relative = {
        "mean": (mean / side_median - 1.0) * 100.0,
        "spread": spread / per_side(_left_out(spread, ignored), np.nanmedian),
        "min": (low / side_median - 1.0) * 100.0,
    }
    features = {sensor_column(k, name): values[:, k] for name, values in relative.items() for k in range(N_SENSORS)}
    found = np.isfinite(worst_depth)
    features["coating"] = np.nanmean(kept, axis=1)
    features["worst_section"] = np.where(found, np.maximum(worst_depth, 0.0) * 100.0, np.nan)
    features["worst_section_at"] = np.where(found, worst_row / max(runs.shape[1] - 1, 1), np.nan)
    features["edge_centre_ratio"] = edge / centre
    features["top_bottom_balance"] = top / bottom
    # a dead sensor or side gives 0/0 or x/0: unknown, not infinite
    features = {name: np.where(np.isfinite(v), v, np.nan) for name, v in features.items()}
    return features
