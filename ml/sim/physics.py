"""Air-knife wiping and the coating profile it leaves, along the length and across the width.

Everything here is *true* coating (g/m² per side); what a gauge reports is in :mod:`ml.sim.sensors`.

Air-knife law
    The coating left on the strip after gas wiping follows, to a good approximation over a line's
    working range, a power law in line speed ``V``, knife-to-strip distance ``Z`` and knife
    pressure ``P`` (Thornton & Graff 1976; Tu 1990; Ellen & Tu 1984 give exponents in these
    ranges)::

        W = W_ref · (V / V_ref)^a · (Z / Z_ref)^b · (P / P_ref)^(−c),   a ≈ 0.6, b ≈ 1.1, c ≈ 0.55

    Faster strip drags more zinc out of the bath, a knife further away hits it with less momentum,
    more pressure wipes harder. The controller inverts the law to find the pressure for its aim.

Across the width (9 sensors per side, operator side → drive side)
    * edge build-up: at the strip edges the jet escapes sideways, impingement pressure drops and the
      coating is heavier (a well-known effect, reduced but not removed by edge baffles);
    * crossbow: the strip is slightly C-shaped, so its centre is nearer one knife than its edges:
      that side is thinner in the centre, the other thicker; the effect is ``b · δ / Z`` and so
      larger for thin coatings, which run with the knife close to the strip;
    * knife tilt: a knife pair not parallel to the strip puts one edge nearer the top knife and the
      same edge further from the bottom knife: a top/bottom imbalance that grows towards the edges;
    * lip profile: a knife lip is never perfectly straight; a fixed per-line pattern of about 1 %.

    The gauge-feedback controller regulates each side's *width-average* coating, so every
    cross-width profile is normalised to mean 1.

Along the length
    * control wander: the pressure loop reacts to a gauge 100–200 m downstream and never sits still;
      modelled as an AR(1) process in log coating;
    * head transient: at a weld the new strip needs another speed, gap and pressure; speed changes
      almost at once, gap and pressure follow with a lag, and the feed-forward only corrects a part
      of the step. The head of the coil carries the residual, which decays over tens of metres;
    * tail transient: the line starts changing speed for the next strip shortly before the weld.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from ml.matrix import SENSORS_PER_SIDE

# Distance of each sensor from the nearer strip edge, in sensor pitches (0 = the edge sensor).
EDGE_DISTANCE = np.minimum(np.arange(SENSORS_PER_SIDE), np.arange(SENSORS_PER_SIDE)[::-1]).astype(float)
# Sensor position across the width, −1 (operator side) … +1 (drive side), at each sensor's centre.
WIDTH_POS = (np.arange(SENSORS_PER_SIDE) + 0.5) / SENSORS_PER_SIDE * 2.0 - 1.0


@dataclass(frozen=True)
class KnifeLaw:
    """Empirical air-knife law ``W = W_ref (V/V_ref)^a (Z/Z_ref)^b (P/P_ref)^-c`` (g/m² per side)."""

    w_ref: float = 100.0  # g/m² per side at the reference settings
    v_ref: float = 120.0  # m/min
    z_ref: float = 10.0  # mm, knife-to-strip distance
    p_ref: float = 30.0  # kPa, knife (plenum) pressure
    a: float = 0.6
    b: float = 1.1
    c: float = 0.55
    p_min: float = 6.0  # kPa; below this the jet is unstable
    p_max: float = 65.0  # kPa; blower limit

    def coating(self, v: float, z: float | np.ndarray, p: float) -> float | np.ndarray:
        return self.w_ref * (v / self.v_ref) ** self.a * (z / self.z_ref) ** self.b * (p / self.p_ref) ** (-self.c)

    def pressure_for(self, w: float, v: float, z: float) -> float:
        """Pressure that gives coating ``w`` at speed ``v`` and distance ``z`` (unclipped)."""
        return self.p_ref * (self.w_ref / w * (v / self.v_ref) ** self.a * (z / self.z_ref) ** self.b) ** (1 / self.c)


def edge_profile(build_up: float, wear: float = 0.0, wear_length: float = 1.2, wear_side: float = 0.75) -> np.ndarray:
    """Cross-width multiplier (9,) from edge build-up and, under knife wear, edge thinning.

    ``build_up`` is the extra coating on the outermost sensor (0.08 = +8 %), decaying over about
    0.7 sensor pitch. ``wear`` is the thinning at the worn end of the knife (operator side), decaying
    over ``wear_length`` pitches; the drive side wears ``wear_side`` times as much.
    """
    prof = 1.0 + build_up * np.exp(-EDGE_DISTANCE / 0.7)
    if wear:
        op = np.exp(-np.arange(SENSORS_PER_SIDE) / wear_length)
        drive = op[::-1] * wear_side
        prof = prof * (1.0 - wear * (op + drive))
    return prof


def crossbow_offset(delta_mm: float) -> np.ndarray:
    """Knife-distance change (mm, top side; the bottom side gets the opposite) from a C-shaped strip."""
    shape = 1.0 - WIDTH_POS**2
    return -delta_mm * (shape - shape.mean())


def tilt_offset(tilt_mm: float) -> np.ndarray:
    """Knife-distance change (mm, top side; bottom opposite) when the strip is skewed by ``tilt_mm`` edge to edge."""
    return 0.5 * tilt_mm * WIDTH_POS


def side_profiles(
    law: KnifeLaw,
    gap_mm: float,
    top_dz: np.ndarray,
    build_up: float,
    lip: np.ndarray,
    wear: float = 0.0,
    wear_side: float = 0.75,
) -> np.ndarray:
    """Cross-width multipliers (18,) for both sides, each normalised to mean 1 (the controller's job)."""
    z_top = np.maximum(gap_mm + top_dz, 1.0)
    z_bot = np.maximum(gap_mm - top_dz, 1.0)
    edge = edge_profile(build_up, wear, wear_side=wear_side)
    top = (z_top / gap_mm) ** law.b * edge * lip[:SENSORS_PER_SIDE]
    bot = (z_bot / gap_mm) ** law.b * edge * lip[SENSORS_PER_SIDE:]
    return np.concatenate([top / top.mean(), bot / bot.mean()])


def ar1(rng: np.random.Generator, n: int, sigma: float, corr_len: float, size: int = 1) -> np.ndarray:
    """Stationary AR(1) noise (n, size): standard deviation ``sigma``, correlation length ``corr_len`` samples."""
    phi = float(np.exp(-1.0 / max(corr_len, 1e-6)))
    e = rng.standard_normal((n, size)) * sigma * np.sqrt(1 - phi**2)
    e[0] = rng.standard_normal(size) * sigma
    return lfilter([1.0], [1.0, -phi], e, axis=0)


def head_transient(s_m: np.ndarray, log_step: float, residual: float, decay_m: float) -> np.ndarray:
    """Log-coating deviation at the head of a coil after a change of settings at the weld.

    ``log_step`` is ``log`` of what the old settings would leave on the new strip relative to the
    new aim (negative: too thin); ``residual`` the part the feed-forward did not correct; it decays
    with the pressure/gap loop over ``decay_m`` metres.
    """
    return residual * log_step * np.exp(-s_m / decay_m)


def tail_transient(s_to_end_m: np.ndarray, log_step: float, residual: float, ramp_m: float) -> np.ndarray:
    """Log-coating deviation at the tail when the line changes speed for the next strip before the weld."""
    return residual * log_step * np.exp(-s_to_end_m / ramp_m)
