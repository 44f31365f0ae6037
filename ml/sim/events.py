"""Local coating defects: what happens to a stretch of strip, applied as multipliers on the true coating.

Each function draws the event's geometry from ``rng`` and multiplies it into ``mult`` (fine rows ×
18 sensors, in place); it returns a short description for the coil's ``defects`` list.

Knife clogging (``clog``)
    A zinc splash or dross particle lodged at the knife lip disturbs the jet. Where the particle
    *deflects* the jet onto the strip the local impingement pressure rises and the strip is
    over-wiped: a thin stripe, one sensor wide or spilling onto a neighbour, on one side only,
    from the moment the particle lodges until it is blown out (or the coil ends). Its depth
    depends on how much of the slot is disturbed: a small deposit takes 2–18 %, a lodged particle
    25–50 % (half and half by default). Lodged particles are the main cause of NOK coils.
Heavy streak (``heavy-streak``)
    A deposit that *starves* the jet behind it leaves a heavier stripe instead. Never a NOK (the
    standard has no maximum that matters here), but it teaches a model that a stripe alone is not
    a defect: only a thin one is.
Edge streak (``edge-streak``, knife-wear drift only)
    A worn, notched lip end makes the edge jet unstable: intermittent thin stretches on the
    outermost one or two sensors of one side.
Pressure surge (``pressure-surge``, new-defect drift only)
    A pressure-control valve that starts to hunt gives periodic pressure peaks on one knife; each
    peak over-wipes the whole width of that side for a few sections: transverse thin bands,
    repeating along the length. Nothing in the default line makes a short, full-width band in the
    middle of a coil.
"""

from __future__ import annotations

import numpy as np

from ml.matrix import SENSORS_PER_SIDE


def _stretch(rng: np.random.Generator, n: int, min_frac: float, max_frac: float) -> tuple[int, int]:
    """A random stretch [start, stop) of the ``n`` fine rows whose length is a fraction of the coil."""
    length = max(int(n * rng.uniform(min_frac, max_frac)), 1)
    start = int(rng.integers(0, n))
    return start, min(start + length, n)


def clog(rng: np.random.Generator, mult: np.ndarray, deep_share: float) -> str:
    """Thin stripe from a deflected jet: one side, one sensor (+ part of a neighbour), part of the length."""
    n = len(mult)
    side = int(rng.integers(0, 2))
    k = int(rng.integers(0, SENSORS_PER_SIDE))
    deep = rng.random() < deep_share
    depth = rng.uniform(0.25, 0.50) if deep else rng.uniform(0.02, 0.18)
    start, stop = _stretch(rng, n, 0.04, 0.7)
    if rng.random() < 0.25:  # stays lodged until the knife is cleaned between coils
        stop = n
    col = side * SENSORS_PER_SIDE + k
    mult[start:stop, col] *= 1.0 - depth
    nb = k + (1 if rng.random() < 0.5 else -1)
    if 0 <= nb < SENSORS_PER_SIDE and rng.random() < 0.6:
        mult[start:stop, side * SENSORS_PER_SIDE + nb] *= 1.0 - depth * rng.uniform(0.2, 0.9)
    return "clog"


def heavy_streak(rng: np.random.Generator, mult: np.ndarray) -> str:
    """Heavier stripe behind a starved stretch of the jet (harmless)."""
    n = len(mult)
    col = int(rng.integers(0, 2 * SENSORS_PER_SIDE))
    start, stop = _stretch(rng, n, 0.05, 0.8)
    mult[start:stop, col] *= 1.0 + rng.uniform(0.08, 0.30)
    return "heavy-streak"


def edge_streak(rng: np.random.Generator, mult: np.ndarray, depth_scale: float = 1.0) -> str:
    """Intermittent thin stretches on the outer one or two sensors of one side (worn lip end)."""
    n = len(mult)
    side = int(rng.integers(0, 2))
    op_side = rng.random() < 0.65  # the operator-side lip end wears faster on this line
    k0, k1 = (0, 1) if op_side else (SENSORS_PER_SIDE - 1, SENSORS_PER_SIDE - 2)
    depth = rng.uniform(0.14, 0.38) * depth_scale
    for _ in range(int(rng.integers(1, 4))):
        start, stop = _stretch(rng, n, 0.03, 0.2)
        mult[start:stop, side * SENSORS_PER_SIDE + k0] *= 1.0 - depth
        mult[start:stop, side * SENSORS_PER_SIDE + k1] *= 1.0 - depth * rng.uniform(0.3, 0.8)
    return "edge-streak"


def pressure_surge(rng: np.random.Generator, mult: np.ndarray, fine: int, depth_scale: float = 1.0) -> str:
    """Periodic full-width thin bands on one side from a hunting pressure valve.

    ``fine`` is the number of fine rows per section; bands are 2–5 sections long, every 10–30
    sections, for a burst of 3–8 peaks.
    """
    n = len(mult)
    side = int(rng.integers(0, 2))
    cols = slice(side * SENSORS_PER_SIDE, (side + 1) * SENSORS_PER_SIDE)
    period = int(rng.integers(10, 31)) * fine
    length = int(rng.integers(2, 6)) * fine
    depth = rng.uniform(0.10, 0.38) * depth_scale
    start = int(rng.integers(0, max(n - period, 1)))
    for i in range(int(rng.integers(3, 9))):
        a = start + i * period
        if a >= n:
            break
        peak = depth * rng.uniform(0.85, 1.0)
        mult[a : a + length, cols] *= 1.0 - peak
    return "pressure-surge"
