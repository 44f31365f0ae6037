"""The simulated line: an endless, seeded stream of coils with their measurement and labels.

Determinism
    Every coil ``i`` draws from its own random streams, derived from ``(seed, purpose, i)``: the
    process, the measurement, the labels, the order book and the drift each have one. The only state
    carried from coil to coil is what a real line carries (the running campaign, the settings the
    previous coil left in the knife, the clock), so ``take(10)`` twice gives exactly the coils of
    one ``take(20)``, and switching a drift on changes only what the drift touches: the same seed
    with and without ``sensor-drift`` gives the same coils, measured differently.

One coil
    1. order book: coating class, width, thickness, coil mass (campaigns of the same class);
    2. settings: line speed from the furnace throughput, knife gap for the class, pressure from the
       inverted knife law for the aim (clipped to the blower's range);
    3. true coating at ``fine`` rows per section: aim × controller error × wander × head/tail
       transients × cross-width profile × local defects, then averaged into 264 sections;
    4. measurement (noise, calibration, stuck sensors, drops) and labels (on the truth).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from ml.dataset import CoilDataset
from ml.matrix import N_SECTIONS, N_SENSORS, SENSORS_PER_SIDE
from ml.sim import drift as drift_mod
from ml.sim import events, physics
from ml.sim.config import LineConfig
from ml.sim.drift import DriftConfig
from ml.sim.labels import judge
from ml.sim.products import (
    COATING_NAMES,
    COATINGS,
    THICKNESS_WEIGHTS,
    THICKNESSES_MM,
    WIDTH_WEIGHTS,
    WIDTHS_MM,
    coil_length_m,
    line_speed_mpm,
    mix_probabilities,
)
from ml.sim.sensors import measure, section_means

# Purposes of the per-coil random streams (the middle number of the seed sequence). The process
# stream also serves measurement, labels and clock: its draws never depend on the drift or the product.
_LINE, _PROCESS, _DRIFT, _ORDERS = range(4)


@dataclass
class SimCoil:
    """One simulated coil: what the gateway publishes, plus the simulator's ground truth."""

    coil_id: str
    line: str
    produced_at: datetime  # tz-aware UTC, when the coil's tail left the line
    product: dict[str, Any]  # {"coating": "Z275", "width_mm": 1250, "thickness_mm": 0.8}
    thickness: np.ndarray  # (264, 18) float32, g/m² per side as measured, NaN = dropped
    label: int  # the operator's label (1 = NOK), with label noise
    true_label: int  # from the true coating and the label rule
    borderline: bool  # |margin| below the borderline band
    defects: list[str] = field(default_factory=list)  # what the simulator put in
    index: int = 0  # the line's coil counter
    margin: float = 0.0  # worst run / per-side minimum − 1 (negative ⇔ NOK)
    min_side: float = 0.0  # the product's per-side minimum, g/m²
    speed_mpm: float = 0.0
    length_m: float = 0.0
    drift_level: float = 0.0
    true_thickness: np.ndarray | None = field(default=None, repr=False)  # (264, 18) float32 true coating


@dataclass(frozen=True)
class _Order:
    coating: str
    width_mm: int
    thickness_mm: float
    mass_t: float
    campaign_left: int


@dataclass(frozen=True)
class _Settings:
    aim: float
    speed: float
    gap: float


def _rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, index])


class LineSimulator:
    """A seeded galvanizing line. Iterate :meth:`stream`, or use :meth:`take` / :meth:`dataset`."""

    def __init__(self, config: LineConfig | None = None) -> None:
        self.config = config or LineConfig()
        cfg = self.config
        self.law = physics.KnifeLaw()
        self.index = cfg.first_index
        self._drift: DriftConfig | None = cfg.drift.anchored(cfg.first_index) if cfg.drift else None
        self._clock = cfg.start
        self._orders: dict[int, _Order] = {}
        self._prev: _Settings | None = None
        self._base_mix = mix_probabilities(cfg.product_mix)
        self._target_mix = mix_probabilities(drift_mod.PRODUCT_MIX_TARGET)
        # What belongs to the line rather than to a coil: the lips' irregularity, which gauges would
        # drift if their calibration went, which lip end is the worse one.
        rng = _rng(cfg.seed, _LINE, 0)
        self.lip = 1.0 + cfg.lip_sigma * rng.standard_normal(N_SENSORS)
        interior = [k for k in range(N_SENSORS) if k % SENSORS_PER_SIDE not in (0, SENSORS_PER_SIDE - 1)]
        self._drift_sensors = tuple(int(k) for k in rng.choice(interior, len(drift_mod.SENSOR_DRIFT_GAINS), False))

    # ------------------------------------------------------------------ public API
    @property
    def drift(self) -> DriftConfig | None:
        return self._drift

    def set_drift(self, drift: DriftConfig | None) -> None:
        """Switch a drift on (or off, with None) from the next coil; an open ``start`` means "now"."""
        self._drift = drift.anchored(self.index) if drift is not None else None
        # The order for the next coil was drawn ahead (the tail transient needs it); a product-mix
        # drift must be able to change it.
        self._orders = {i: o for i, o in self._orders.items() if i < self.index}

    def drift_details(self) -> dict[str, Any]:
        """What the current drift does on this line (the drifted sensors and their gains, …)."""
        if self._drift is None:
            return {}
        d = self._drift.to_dict()
        if self._drift.scenario == "sensor-drift":
            d["sensors"] = list(self.drifted_sensors)
            d["gains_at_full"] = [g * self._drift.severity for g in drift_mod.SENSOR_DRIFT_GAINS]
        return d

    @property
    def drifted_sensors(self) -> tuple[int, ...]:
        """Sensors a ``sensor-drift`` affects on this line (set by the drift or drawn from the seed)."""
        if self._drift is not None and self._drift.sensors is not None:
            return self._drift.sensors
        return self._drift_sensors

    def stream(self) -> Iterator[SimCoil]:
        """Endless coils; the simulator's state carries on between calls."""
        while True:
            yield self.next_coil()

    def take(self, n: int) -> list[SimCoil]:
        return list(itertools.islice(self.stream(), n))

    def dataset(self, n: int) -> CoilDataset:
        """The next ``n`` coils as a :class:`CoilDataset` (``y`` = the operator's label)."""
        first = self.index
        return coils_to_dataset(self.take(n), self, first_index=first)

    # ------------------------------------------------------------------ one coil
    def level(self, index: int, scenario: str) -> float:
        d = self._drift
        return d.level(index) if d is not None and d.scenario == scenario else 0.0

    def next_coil(self) -> SimCoil:
        cfg, law = self.config, self.law
        i = self.index
        order, nxt = self._order(i), self._order(i + 1)
        self._orders.pop(i - 1, None)
        coating = COATINGS[order.coating]
        rng = _rng(cfg.seed, _PROCESS, i)
        defects: list[str] = []

        # settings
        aim = coating.aim_side(cfg.aim_margin, cfg.aim_floor)
        speed = line_speed_mpm(order.thickness_mm, order.width_mm, cfg.throughput_t_min, cfg.v_max_mpm)
        gap = coating.knife_gap_mm + cfg.gap_sigma_mm * rng.standard_normal()
        p_need = law.pressure_for(aim, speed, gap)
        p_set = float(np.clip(p_need, law.p_min, law.p_max))
        saturation = float(np.log((p_set / p_need) ** (-law.c)))
        if abs(saturation) > 0.01:
            defects.append("pressure-limit")
        prev = self._prev or _Settings(aim, speed, gap)
        nxt_speed = line_speed_mpm(nxt.thickness_mm, nxt.width_mm, cfg.throughput_t_min, cfg.v_max_mpm)
        length = coil_length_m(order.mass_t, order.thickness_mm, order.width_mm)

        # along the length (log coating, per side)
        n = N_SECTIONS * cfg.fine
        s = (np.arange(n) + 0.5) / n * length
        ctrl = cfg.control_sigma * (0.7 * rng.standard_normal() + 0.7 * rng.standard_normal(2))
        # the wander is slow (tens of sections): drawn per section, held within it
        wander = np.repeat(physics.ar1(rng, N_SECTIONS, cfg.wander_sigma, cfg.wander_sections, size=3), cfg.fine, 0)
        along = ctrl + saturation + 0.7 * wander[:, :1] + 0.7 * wander[:, 1:]
        # at the weld the speed is new but gap and pressure are still the old coil's, which left aim_old
        # at the old speed: the head starts at aim_old · (V_new / V_old)^a
        head_step = np.log(prev.aim / aim) + law.a * np.log(speed / prev.speed)
        head = physics.head_transient(s, head_step, rng.uniform(*cfg.ff_residual), rng.uniform(*cfg.head_decay_m))
        tail = physics.tail_transient(
            length - s,
            law.a * np.log(nxt_speed / speed),
            rng.uniform(*cfg.tail_residual),
            rng.uniform(*cfg.tail_ramp_m),
        )
        ends = head + tail
        reach = cfg.fine * (cfg.trim_sections + 3)  # a transient that reaches past the trimmed rows
        if max(np.abs(ends[:reach]).max(), np.abs(ends[-reach:]).max()) > 0.05:
            defects.append("speed-transient")
        along = along + ends[:, None]

        # across the width
        crossbow = cfg.crossbow_sigma_mm * np.sqrt(0.8 / order.thickness_mm) * rng.standard_normal()
        tilt = cfg.tilt_sigma_mm * rng.standard_normal()
        if rng.random() < cfg.tilt_rate:
            tilt = rng.choice([-1.0, 1.0]) * rng.uniform(*cfg.tilt_event_mm)
            defects.append("tilt")
        build_up = cfg.edge_build_up * (1.0 + 0.25 * rng.standard_normal())
        wear_level = self.level(i, "knife-wear")
        wear = 0.0
        if wear_level:
            build_up *= 1.0 - min(wear_level, 1.0) * drift_mod.KNIFE_WEAR_BUILD_UP_LOSS
            wear = wear_level * drift_mod.KNIFE_WEAR_THINNING * (p_set / law.p_ref) ** 0.3
            defects.append("edge-wear")
        dz = physics.crossbow_offset(crossbow) + physics.tilt_offset(tilt)
        profile = physics.side_profiles(law, gap, dz, build_up, self.lip, wear)

        # local defects, as multipliers on the fine grid (only built when a coil has one); drift
        # events draw from their own stream so that a drift leaves the rest of the coil as it was
        clog = rng.random() < cfg.clog_rate
        heavy = rng.random() < cfg.heavy_streak_rate
        edge = surge = False
        surge_level = self.level(i, "new-defect")
        drng = _rng(cfg.seed, _DRIFT, i) if wear_level or surge_level else None
        if drng is not None:
            edge = bool(wear_level) and drng.random() < wear_level * drift_mod.KNIFE_WEAR_STREAK_RATE
            surge = bool(surge_level) and drng.random() < surge_level * drift_mod.NEW_DEFECT_RATE
        sides = aim * np.exp(along)  # (n, 2): the width profile multiplies each side's level
        if clog or heavy or edge or surge:
            mult = np.ones((n, N_SENSORS))
            if clog:
                defects.append(events.clog(rng, mult, cfg.clog_deep_share))
            if heavy:
                defects.append(events.heavy_streak(rng, mult))
            if edge:
                defects.append(events.edge_streak(drng, mult))
            if surge:
                defects.append(events.pressure_surge(drng, mult, cfg.fine))
            true = section_means(np.repeat(sides, SENSORS_PER_SIDE, axis=1) * profile * mult, cfg.fine)
        else:
            true = np.repeat(section_means(sides, cfg.fine), SENSORS_PER_SIDE, axis=1) * profile

        # measurement and labels
        gains = None
        cal_level = self.level(i, "sensor-drift")
        if cal_level:
            gains = np.zeros(N_SENSORS)
            gains[list(self.drifted_sensors)] = cal_level * np.array(drift_mod.SENSOR_DRIFT_GAINS)
            defects.append("calibration-drift")
        measured, faults = measure(true, rng, cfg.sensor_model, gains)
        defects.extend(faults)
        verdict = judge(true, coating.min_side, cfg.label_rule, rng)

        # clock and identity
        minutes = length / speed + rng.uniform(0.5, 2.0)
        if rng.random() < cfg.stop_rate:
            minutes += rng.uniform(20.0, 180.0)
        self._clock = self._clock + timedelta(minutes=float(minutes))
        self._prev = _Settings(aim, speed, gap)
        self.index += 1
        level = self._drift.level(i) if self._drift is not None else 0.0
        return SimCoil(
            coil_id=f"{cfg.id_prefix}-{self._clock.year}-{i + 1:06d}",
            line=cfg.line,
            produced_at=self._clock.replace(microsecond=0),
            product={"coating": order.coating, "width_mm": int(order.width_mm), "thickness_mm": order.thickness_mm},
            thickness=measured,
            label=verdict.label,
            true_label=verdict.true_label,
            borderline=verdict.borderline,
            defects=defects,
            index=i,
            margin=verdict.margin,
            min_side=coating.min_side,
            speed_mpm=speed,
            length_m=length,
            drift_level=level,
            true_thickness=true.astype(np.float32),
        )

    # ------------------------------------------------------------------ order book
    def _order(self, i: int) -> _Order:
        """The order for coil ``i`` (campaigns carry over from coil ``i − 1``); cached, drawn once."""
        if i in self._orders:
            return self._orders[i]
        prev = self._orders.get(i - 1)
        if prev is None and i > self.config.first_index:
            prev = self._order(i - 1)
        cfg = self.config
        rng = _rng(cfg.seed, _ORDERS, i)
        u = rng.random(6)
        if prev is not None and prev.campaign_left > 0:
            coating, left = prev.coating, prev.campaign_left - 1
        else:
            lvl = min(self.level(i, "product-mix"), 1.0)
            mix = (1.0 - lvl) * self._base_mix + lvl * self._target_mix
            coating = COATING_NAMES[int(np.searchsorted(np.cumsum(mix), u[0] * mix.sum()))]
            left = int(rng.geometric(1.0 / cfg.campaign_mean)) - 1
        if prev is not None and prev.coating == coating and u[1] < cfg.format_keep:
            width, thickness = prev.width_mm, prev.thickness_mm
        else:
            cum = np.cumsum(WIDTH_WEIGHTS)
            width = int(WIDTHS_MM[np.searchsorted(cum, u[2] * cum[-1])])
            cum = np.cumsum(THICKNESS_WEIGHTS)
            thickness = float(THICKNESSES_MM[np.searchsorted(cum, u[3] * cum[-1])])
        mass = cfg.coil_mass_t[0] + u[4] * (cfg.coil_mass_t[1] - cfg.coil_mass_t[0])
        order = _Order(coating, width, thickness, round(float(mass), 2), left)
        self._orders[i] = order
        return order


def coils_to_dataset(
    coils: list[SimCoil], sim: LineSimulator | None = None, first_index: int | None = None
) -> CoilDataset:
    """Pack coils into a :class:`CoilDataset` with the simulator's facts in ``meta``."""
    X = np.stack([c.thickness for c in coils]) if coils else np.zeros((0, N_SECTIONS, N_SENSORS), np.float32)
    meta: dict[str, Any] = {"source": "sim"}
    if sim is not None:
        meta.update(
            seed=sim.config.seed,
            line=sim.config.line,
            scenario=sim.drift.scenario if sim.drift else None,
            drift=sim.drift_details(),
            first_index=first_index,
            config=sim.config.to_dict(),
        )
    meta["columns"] = {
        "coating": [c.product["coating"] for c in coils],
        "width_mm": [c.product["width_mm"] for c in coils],
        "thickness_mm": [c.product["thickness_mm"] for c in coils],
        "y_true": [c.true_label for c in coils],
        "borderline": [c.borderline for c in coils],
        "defects": [",".join(c.defects) for c in coils],  # comma-separated, "" for none
        "margin": [round(c.margin, 5) for c in coils],
        "min_side": [c.min_side for c in coils],
        "index": [c.index for c in coils],
        "drift_level": [round(c.drift_level, 5) for c in coils],
    }
    produced = [np.datetime64(c.produced_at.replace(tzinfo=None), "ms") for c in coils]
    return CoilDataset(
        X,
        np.array([c.label for c in coils], dtype=np.int8),
        np.array([c.coil_id for c in coils], dtype=str),
        np.array(produced, dtype="datetime64[ms]"),
        meta,
    )
