"""Normalization with the global population limits of the training data (the coil paper's §3.1).

One pair of limits for the whole population, not per coil: a thin coil must still look thin after
normalization, and a Z100 coil must look different from a Z275 one. The limits travel in each
model's manifest so that AssessCoils normalizes a live coil exactly as the model's training data was.

Where gauges have drifted since a model learned, ReTrain may give the model ``gauge_gains`` (ml/recalibration.py):
each reading is divided by its gauge's gain first, so that the model sees a coil measured today as the gauges
measured when it learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ml.matrix import N_SENSORS, as_matrix_batch


@dataclass(frozen=True)
class Normalizer:
    low: float  # g/m² mapped to 0
    high: float  # g/m² mapped to 1
    gauge_gains: tuple[float, ...] | None = None  # per sensor: how far each gauge has drifted since the model learned

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            # NaN or infinite limits make every normalized coil NaN, and a model then abstains on all of them
            raise ValueError(f"normalization limits must be finite with high > low, got {self.low!r}, {self.high!r}")
        if self.gauge_gains is not None and (
            len(self.gauge_gains) != N_SENSORS or not all(math.isfinite(g) and g > 0 for g in self.gauge_gains)
        ):
            raise ValueError(f"gauge_gains must be {N_SENSORS} positive factors (finite), got {self.gauge_gains!r}")

    @classmethod
    def fit(cls, X: np.ndarray, quantiles: tuple[float, float] = (0.001, 0.999), margin: float = 0.25) -> Normalizer:
        """Limits from the bulk of the population, widened by ``margin`` of its span on each side.

        The quantiles keep a stuck or wild sensor from stretching the scale for everybody; the margin
        keeps the rare thin spots (a few NOK sections among millions of readings, below the 0.1 %
        quantile by nature) from being clipped into the same value as ordinary noise.
        """
        values = as_matrix_batch(X)
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise ValueError("no readings to fit normalization limits on")
        with np.errstate(invalid="ignore"):  # inf − inf between infinite readings: refused just below
            low, high = (float(v) for v in np.quantile(values, quantiles))
        if not (math.isfinite(low) and math.isfinite(high)):
            n_infinite = int(np.isinf(values).sum())
            raise ValueError(
                f"the readings give non-finite normalization limits ({low}, {high}): {n_infinite} of them are "
                "infinite; mark a dropped reading with NaN"
            )
        span = max(high - low, 1.0)
        return cls(max(low - margin * span, 0.0), high + margin * span)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(N, 264, 18) g/m² with NaN → float32 in [0, 1], dropped readings filled, values clipped.

        In chunks of coils written into one output: on a whole training set at once the temporaries (the filled
        copy, masks, the scaled intermediate) grew with it, a peak of 5.5 GB against 3.8 GB now at 30,000 labelled
        coils (docs/benchmarks.md, ReTrain's inputs); now they are one chunk's."""
        X = as_matrix_batch(X)
        out = np.empty(X.shape, dtype=np.float32)
        gains = np.asarray(self.gauge_gains, dtype=np.float32) if self.gauge_gains is not None else None
        scale = np.float32(1.0 / (self.high - self.low))
        for start in range(0, len(X), TRANSFORM_CHUNK):
            part, done = fill_dropped(X[start : start + TRANSFORM_CHUNK]), out[start : start + TRANSFORM_CHUNK]
            if gains is not None:
                part = part / gains
            np.subtract(part, np.float32(self.low), out=done)
            np.multiply(done, scale, out=done)
            np.clip(done, 0.0, 1.0, out=done)
        return out

    def without_gauge_gains(self) -> Normalizer:
        """The limits alone: what a model trained on coils in the gauges' current calibration needs."""
        return replace(self, gauge_gains=None)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": "global-limits", "low": self.low, "high": self.high}
        if self.gauge_gains is not None:
            data["gauge_gains"] = list(self.gauge_gains)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        if data.get("method", "global-limits") != "global-limits":
            raise ValueError(f"unknown normalization method {data.get('method')!r}")
        gains = data.get("gauge_gains")
        return cls(float(data["low"]), float(data["high"]), tuple(float(g) for g in gains) if gains else None)


TRANSFORM_CHUNK = 2048  # coils normalized at a time: 39 MB of float32 temporaries


def fill_dropped(X: np.ndarray) -> np.ndarray:
    """Replace dropped readings (NaN) by the same sensor's mean over the coil; a sensor dropped on the
    whole coil takes the coil's mean. Filling along the sensor keeps a stripe a stripe."""
    missing = np.isnan(X)
    if not missing.any():
        return X
    X = X.copy()
    # sums and counts rather than np.nanmean under warnings.catch_warnings(), which is not thread-safe
    # and the ensemble's shards normalize at once
    present = ~missing
    sums = np.where(present, X, 0).sum(axis=1, keepdims=True)  # (N, 1, 18)
    counts = present.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-dropped sensors are expected here
        column_mean = sums / counts
        coil_mean = sums.sum(axis=2, keepdims=True) / counts.sum(axis=2, keepdims=True)  # (N, 1, 1)
    column_mean = np.where(np.isnan(column_mean), coil_mean, column_mean)
    column_mean = np.nan_to_num(column_mean, nan=0.0)
    X[missing] = np.broadcast_to(column_mean, X.shape)[missing]
    return X
