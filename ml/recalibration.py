"""Old coils re-expressed in the gauges' current calibration, so that a model retrained after a gauge drifted
can still learn from the whole history.

An X-ray gauge drifts in gain (source decay, a fouled window, detector ageing; see ``ml/sim/sensors.py``): a
drifted gauge reads every coil the same share high or low. After such a drift ReTrain has a few hundred newly
labelled coils measured the new way and thousands of history coils measured the old way. Taught on both, a
network has to learn that the same full-length stripe is normal in one set and a thin stripe in the other,
from the handful of NOK coils among the new ones, and it did not (docs/benchmarks.md, drift recovery).
Multiplying each history coil's sensor by the gain its gauge has drifted by puts the whole history, NOK coils
included, into the current calibration.

The gain of a sensor is its typical level relative to its side's median sensor (1 + :func:`sensor_offsets`)
over recent OK coils, divided by the same over the history's OK coils, and then by the median of its side's
gains (see :func:`estimate_gains`). Relative to its own side, the level does not move with the product mix
(a Z100 and a Z275 coil have the same profile), only with the gauge, or with a real change of the cross
profile such as worn knife lips, which the ratio then carries into the history as well; the
champion/challenger comparison on the newest labelled coils judges the result either way. OK coils only,
so that NOK stripes do not bias a sensor's level; gains within ``tolerance`` of 1 stay 1, so that the history
of a line whose gauges did not move is used exactly as it was. A gain outside [``MIN_GAIN``, ``MAX_GAIN``] is
not a calibration drift but a dead or wild gauge: it stays 1 and is reported, so that a repaired gauge is not
left scaled to nothing in every later history.

The same gains can also be undone on a model's input instead (:func:`read_through`): the model, unchanged,
divides each live reading by its gauge's gain and sees the coil as its gauges measured when it learned. For a
pure gauge drift that is the whole fix, without the noise of a retraining; ReTrain offers it beside the
retrained challenger (docs/benchmarks.md, drift recovery).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.drift import BODY, per_side
from ml.matrix import as_matrix_batch

if TYPE_CHECKING:
    from ml.assessors.base import Assessor

MIN_GAIN, MAX_GAIN = 0.5, 2.0  # beyond these a gauge is broken, not off calibration


def sensor_levels(X: np.ndarray) -> np.ndarray:
    """(N, 18) each sensor's median reading over the coil body."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sensor dropped over the whole body gives NaN
        return np.nanmedian(as_matrix_batch(X)[:, BODY], axis=1)


def sensor_offsets(X: np.ndarray) -> np.ndarray:
    """(N, 18) each sensor's body median relative to the median of its side's sensors, minus 1.

    A calibrated gauge sits within a few per cent of its side (lip profile, crossbow, edge build-up);
    a gauge with a gain error sits off by that error on every coil.
    """
    levels = sensor_levels(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return levels / per_side(levels, np.nanmedian) - 1.0


@dataclass(frozen=True)
class GaugeGains:
    """Per-sensor factors that take a coil measured the history's way to the gauges' current way."""

    gains: np.ndarray  # (18,), 1 where a gauge did not move by more than the tolerance
    n_recent: int  # OK coils the current calibration was read from
    n_history: int
    tolerance: float
    implausible: tuple[int, ...] = ()  # sensors whose gain was outside [MIN_GAIN, MAX_GAIN], left at 1

    @property
    def moved(self) -> dict[int, float]:
        """Sensor → gain, for the gauges that moved."""
        return {k: float(g) for k, g in enumerate(self.gains) if g != 1.0}

    def apply(self, X: np.ndarray) -> np.ndarray:
        return (as_matrix_batch(X) * self.gains[None, None, :]).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """What a manifest and a ReTrain run record."""
        return {
            "gains": {f"s{k:02d}": round(g, 4) for k, g in self.moved.items()},
            "recent_ok_coils": self.n_recent,
            "history_ok_coils": self.n_history,
            "tolerance": self.tolerance,
            "implausible": [f"s{k:02d}" for k in self.implausible],
        }


def estimate_gains(
    recent_ok: np.ndarray, history_ok: np.ndarray, *, tolerance: float = 0.02, min_coils: int = 30
) -> GaugeGains | None:
    """The gauges' drift between ``history_ok`` and ``recent_ok`` (OK coils, (N, 264, 18)); None with fewer
    than ``min_coils`` coils on either side, too few to tell a gauge from the product mix. Fewer than half the
    gauges of a side are taken to have moved: were most of them to drift together, it would read as the
    others moving."""
    if len(recent_ok) < min_coils or len(history_ok) < min_coils:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        now = np.nanmedian(1.0 + sensor_offsets(recent_ok), axis=0)
        then = np.nanmedian(1.0 + sensor_offsets(history_ok), axis=0)
        gains = now / then
        # a drifted gauge also moves its side's median a little (the side's readings change order), which
        # shows as every other gauge of the side moving the other way: most gauges of a side are taken to
        # have stayed, so each side's gains are divided by their median
        gains /= per_side(gains[None, :], np.nanmedian)[0]
    implausible = ~np.isfinite(gains) | (gains < MIN_GAIN) | (gains > MAX_GAIN)
    gains[implausible | (np.abs(gains - 1.0) <= tolerance)] = 1.0
    broken = tuple(int(k) for k in np.flatnonzero(implausible))
    return GaugeGains(gains.astype(np.float64), len(recent_ok), len(history_ok), tolerance, broken)


def read_through(model: Assessor, gains: GaugeGains) -> Assessor:
    """A copy of ``model`` that undoes ``gains`` on every coil it reads (its normalizer's ``gauge_gains``) and
    says so in its training data; the network is shared, not copied, since neither is trained again. ``gains``
    must be relative to the data the network learned from (its training history): they replace any gains the
    model had, they are not added to them."""
    if model.normalizer is None:
        raise ValueError(f"{model.describe()} reads no coil matrices to recalibrate")
    adjusted = copy.copy(model)
    adjusted.normalizer = replace(model.normalizer, gauge_gains=tuple(float(g) for g in gains.gains))
    adjusted.training_data = {**model.training_data, "recalibration": {**gains.summary(), "applied_to": "inputs"}}
    return adjusted
