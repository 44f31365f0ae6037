"""From true coating to what the gauges report: averaging, noise, calibration, stuck and dropped readings.

The labels are decided on the *true* coating (:mod:`ml.sim.labels`); a model only ever sees the
measurement. Keeping the two apart is what makes sensor faults and calibration drift real problems:
a gauge that reads low paints a thin stripe where there is none, one that reads high hides a real
one.

* Section averaging: the simulator works at ``fine`` rows per section and the matrix holds their
  mean, as a gateway averaging a gauge's samples over each of the 264 sections would.
* Noise: relative (source statistics, ≈1 %) plus absolute (electronics, ≈0.8 g/m²) Gaussian noise
  per section reading. The absolute part makes thin coatings relatively noisier.
* Calibration (gain) error: X-ray fluorescence and isotope gauges drift mostly in gain (source
  decay, a fouled window, detector ageing), so a calibration error is a relative offset per sensor.
  The default line is calibrated (all 0); the ``sensor-drift`` scenario creeps some sensors off.
* Stuck sensor: from some section on, a sensor repeats its last value (frozen output) or reports a
  dead-detector constant of a few g/m² ("stuck low"). Neither is a coating defect, so neither
  changes the label.
* Dropped readings: single lost readings and bursts where one sensor or a whole gauge head goes
  silent for a run of sections; NaN in the matrix, ``null`` on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.matrix import N_SECTIONS, N_SENSORS, SENSORS_PER_SIDE


@dataclass(frozen=True)
class SensorModel:
    noise_rel: float = 0.010  # relative noise per section reading
    noise_abs: float = 0.8  # g/m² absolute noise per section reading
    drop_rate: float = 0.002  # probability that a single reading is lost
    burst_rate: float = 0.02  # coils with a burst of dropped readings
    stuck_rate: float = 0.012  # coils with a stuck sensor


def section_means(fine: np.ndarray, per_section: int) -> np.ndarray:
    """Average ``fine`` (264·per_section, 18) rows into the 264 sections."""
    return fine.reshape(N_SECTIONS, per_section, fine.shape[1]).mean(axis=1)


def measure(
    true: np.ndarray,
    rng: np.random.Generator,
    model: SensorModel,
    gain_error: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Measured matrix (264, 18) float32 with NaN for dropped readings, and the faults that occurred."""
    faults: list[str] = []
    m = true.astype(np.float32, copy=True)
    if gain_error is not None:
        m *= (1.0 + gain_error).astype(np.float32)
    # relative and absolute noise are independent Gaussians: one draw with the combined deviation
    sd = np.sqrt(np.float32(model.noise_rel) ** 2 * m * m + np.float32(model.noise_abs) ** 2)
    m += sd * rng.standard_normal(m.shape, dtype=np.float32)
    np.maximum(m, 0.0, out=m)

    if rng.random() < model.stuck_rate:
        col = int(rng.integers(0, N_SENSORS))
        row = int(rng.integers(10, N_SECTIONS - 10))
        if rng.random() < 0.5:
            m[row:, col] = m[row - 1, col]  # frozen output
        else:
            m[row:, col] = rng.uniform(0.0, 8.0)  # dead detector
        faults.append("stuck-sensor")

    drops = np.zeros(m.shape, dtype=bool)
    n_drops = int(rng.binomial(m.size, model.drop_rate))
    drops.flat[rng.integers(0, m.size, n_drops)] = True
    if rng.random() < model.burst_rate:
        row = int(rng.integers(0, N_SECTIONS))
        stop = min(row + int(rng.integers(2, 30)), N_SECTIONS)
        if rng.random() < 0.3:  # a whole gauge head (one side)
            side = int(rng.integers(0, 2))
            drops[row:stop, side * SENSORS_PER_SIDE : (side + 1) * SENSORS_PER_SIDE] = True
        else:
            drops[row:stop, int(rng.integers(0, N_SENSORS))] = True
        faults.append("dropout")
    m[drops] = np.nan
    return m, faults
