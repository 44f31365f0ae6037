"""Coating classes, strip formats and the line settings each product runs with.

The coating classes follow EN 10346 (continuously hot-dip coated steel flat products): a ``Zxxx``
class guarantees a *triple-spot* minimum (the mean of three samples across the width, both sides
together) and a *single-spot* minimum (any one sample, both sides together). The inspection gauges
measure one side at one spot, so the simulator translates the single-spot minimum into a per-side
minimum by assuming an evenly split coating: ``min_side = single_spot / 2``. That is the number a
section of the matrix is held to.

A line aims above the minimum (zinc is the largest variable cost, so not by much). The aim is the
triple-spot nominal per side plus a small margin, but never less than ``aim_floor`` g/m² above the
per-side minimum: thin classes need a larger *relative* margin because the gauge's absolute noise and
the air knife's absolute scatter do not shrink with the coating. The consequence, which the
``product-mix`` drift relies on, is that the thinnest class (Z100) tolerates a deeper relative dip
than the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CoatingClass:
    """One EN 10346 zinc coating class and how the line runs it."""

    name: str
    triple_spot: float  # g/m², both sides, minimum mean of three spots
    single_spot: float  # g/m², both sides, minimum of any spot
    knife_gap_mm: float  # nominal knife-to-strip distance the line uses for this class

    @property
    def min_side(self) -> float:
        """Per-side minimum a section must reach (single-spot minimum split evenly over both sides)."""
        return self.single_spot / 2.0

    @property
    def nominal_side(self) -> float:
        """Per-side nominal (triple-spot minimum split evenly)."""
        return self.triple_spot / 2.0

    def aim_side(self, aim_margin: float, aim_floor: float) -> float:
        """Per-side coating the knife controller aims at."""
        return max(self.nominal_side * (1.0 + aim_margin), self.min_side + aim_floor)


# EN 10346, table "coating mass" for Z coatings (g/m², both sides): triple-spot / single-spot minimum.
# Heavier coatings are wiped with the knife further from the strip (lower jet momentum at the strip).
COATINGS: dict[str, CoatingClass] = {
    c.name: c
    for c in (
        CoatingClass("Z100", 100.0, 85.0, 7.0),
        CoatingClass("Z140", 140.0, 120.0, 8.0),
        CoatingClass("Z200", 200.0, 170.0, 10.0),
        CoatingClass("Z225", 225.0, 195.0, 11.0),
        CoatingClass("Z275", 275.0, 235.0, 12.0),
    )
}
COATING_NAMES: tuple[str, ...] = tuple(COATINGS)

# Default order book of the simulated line: construction and automotive grades. Z100 is in the
# catalogue but not ordered (the ``product-mix`` drift brings it in).
DEFAULT_MIX: dict[str, float] = {"Z100": 0.0, "Z140": 0.20, "Z200": 0.30, "Z225": 0.12, "Z275": 0.38}

# Strip formats (mm) and how often they are ordered.
THICKNESSES_MM = np.array([0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0])
THICKNESS_WEIGHTS = np.array([0.07, 0.11, 0.15, 0.20, 0.19, 0.13, 0.10, 0.05])
WIDTHS_MM = np.array([1000, 1100, 1200, 1250, 1350, 1500, 1650])
WIDTH_WEIGHTS = np.array([0.10, 0.14, 0.18, 0.20, 0.16, 0.14, 0.08])

STEEL_DENSITY_T_M3 = 7.85


def mix_probabilities(mix: dict[str, float]) -> np.ndarray:
    """Normalised weights in ``COATING_NAMES`` order; unknown classes are an error, missing ones weigh 0."""
    unknown = set(mix) - set(COATINGS)
    if unknown:
        raise ValueError(f"unknown coating classes {sorted(unknown)}; known: {list(COATINGS)}")
    w = np.array([max(float(mix.get(name, 0.0)), 0.0) for name in COATING_NAMES])
    if w.sum() <= 0:
        raise ValueError("product mix has no positive weight")
    return w / w.sum()


def line_speed_mpm(thickness_mm: float, width_mm: float, throughput_t_min: float, v_max: float) -> float:
    """Line speed: the furnace passes a fixed tonnage per minute, so thin and narrow strip runs faster.

    ``V = Q / (t · w · ρ)`` capped at the line's mechanical maximum (and never below 40 m/min, the
    slowest speed at which the bath still gives an even coating).
    """
    v = throughput_t_min / (thickness_mm * 1e-3 * width_mm * 1e-3 * STEEL_DENSITY_T_M3)
    return float(np.clip(v, 40.0, v_max))


def coil_length_m(mass_t: float, thickness_mm: float, width_mm: float) -> float:
    """Strip length of a coil of ``mass_t`` tonnes."""
    return mass_t / (thickness_mm * 1e-3 * width_mm * 1e-3 * STEEL_DENSITY_T_M3)
