"""Drift scenarios: slow changes of the line that a model trained on the past must survive.

A drift starts at a coil index, grows linearly over ``ramp`` coils and then stays (a plateau), scaled
by ``severity`` (1 = the scenario's full size; the gold set uses a mild 0.3). Its *level* at coil
``i`` is ``severity · clip((i − start) / ramp, 0, 1)``.

``sensor-drift``
    Three gauges (two reading low, one high) creep off calibration, a gain error of
    ``SENSOR_DRIFT_GAINS`` at level 1. Truth and labels do not change; the measurement does. A
    model sees a full-length "thin stripe" on the low sensors that is not there (false NOKs) and
    real thin stripes on the high sensor look shallower (missed NOKs).
``knife-wear``
    The lip ends of the knives erode. The edge build-up disappears and the edge zone turns thin,
    reaching a wider band (``KNIFE_WEAR_THINNING`` at the outermost sensor, decaying over 1.2
    sensor pitches, stronger at high pressure where more gas escapes through the eroded slot end);
    the notched lip also throws intermittent edge streaks. Edges that were the thickest part of
    the strip become the thinnest: more edge NOKs, and an edge profile no pre-drift model saw.
``product-mix``
    The order book changes: Z100, absent from the default mix, becomes the most common class
    (``PRODUCT_MIX_TARGET``). Z100 runs at a coating level below everything else, with the knife
    closest to the strip, and its aim has a larger relative margin over its minimum (see
    :mod:`ml.sim.products`), so both the inputs and the depth of a thin region that makes a NOK
    change.
``new-defect``
    A pressure valve starts hunting: periodic full-width thin bands on one side
    (:func:`ml.sim.events.pressure_surge`) on ``NEW_DEFECT_RATE`` of the coils at level 1. A shape
    never seen before, and about half of the affected coils are NOK.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

SCENARIOS: tuple[str, ...] = ("sensor-drift", "knife-wear", "product-mix", "new-defect")
# Beyond three times a scenario's full size the linear scaling leaves physics: knife wear thins the edge to a
# negative coating (severity 8), a drifted gauge's gain goes below zero (4.2).
MAX_SEVERITY = 3.0

# sensor-drift: gain error of the drifted sensors at level 1 (two read low, one reads high).
SENSOR_DRIFT_GAINS: tuple[float, ...] = (-0.24, -0.18, 0.16)
# knife-wear: thinning of the outermost sensor at level 1, share of build-up lost, edge-streak rate.
KNIFE_WEAR_THINNING = 0.13
KNIFE_WEAR_BUILD_UP_LOSS = 0.85
KNIFE_WEAR_STREAK_RATE = 0.06
# product-mix: the order book at level 1.
PRODUCT_MIX_TARGET: dict[str, float] = {"Z100": 0.55, "Z140": 0.12, "Z200": 0.13, "Z225": 0.05, "Z275": 0.15}
# new-defect: share of coils with a pressure-surge burst at level 1.
NEW_DEFECT_RATE = 0.12


@dataclass(frozen=True)
class DriftConfig:
    """One drift scenario: what, from which coil, how fast and how strong.

    ``start`` is an absolute coil index (the simulator's counter, which begins at
    ``LineConfig.first_index``); ``None`` means "from the coil where it is switched on". ``sensors``
    overrides the sensors a ``sensor-drift`` affects (otherwise drawn from the line's seed).
    """

    scenario: str | None = None
    start: int | None = None
    ramp: int = 300
    severity: float = 1.0
    sensors: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.scenario is not None and self.scenario not in SCENARIOS:
            raise ValueError(f"unknown drift scenario {self.scenario!r}; known: {', '.join(SCENARIOS)}")
        if self.ramp < 0:
            raise ValueError("ramp must not be negative")
        if not 0 <= self.severity <= MAX_SEVERITY:
            raise ValueError(f"severity must be between 0 and {MAX_SEVERITY:g} (1 = the scenario's full size)")
        if self.start is not None and self.start < 0:
            raise ValueError("start must not be negative")
        if self.sensors is not None:
            object.__setattr__(self, "sensors", tuple(int(s) for s in self.sensors))
            if self.scenario == "sensor-drift" and len(self.sensors) != len(SENSOR_DRIFT_GAINS):
                raise ValueError(f"sensor-drift needs {len(SENSOR_DRIFT_GAINS)} sensors")
            if any(not 0 <= s < 18 for s in self.sensors):
                raise ValueError("sensors must be column indices 0–17")
            if len(set(self.sensors)) < len(self.sensors):  # one gain each: a repeated sensor lost a drift
                raise ValueError("sensors must be distinct")

    def level(self, index: int) -> float:
        """Drift strength at coil ``index``: 0 before ``start``, then a linear ramp to ``severity``."""
        if self.scenario is None or self.start is None or index < self.start:
            return 0.0
        if self.ramp == 0:
            return float(self.severity)
        return float(self.severity * min((index - self.start) / self.ramp, 1.0))

    def anchored(self, index: int) -> DriftConfig:
        """This drift with ``start`` fixed to ``index`` when it was left open."""
        return self if self.start is not None else replace(self, start=index)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sensors"] = list(self.sensors) if self.sensors is not None else None
        return d
