"""Every knob of the simulated line, with the defaults that give the documented behaviour (≈3 % NOK)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ml.sim.drift import DriftConfig
from ml.sim.labels import LabelRule
from ml.sim.products import DEFAULT_MIX, mix_probabilities
from ml.sim.sensors import SensorModel

# Applied with fullmatch: under re.match a "$" also matches before a final newline.
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,40}")


@dataclass(frozen=True)
class LineConfig:
    """A simulated galvanizing line. Same config (seed included) ⇒ the same coils, bit for bit.

    Parameters are grouped as in ``docs/simulator.md``; every one is documented there.
    """

    # identity and time
    seed: int = 0
    line: str = "galv-1"
    id_prefix: str = "C"  # coil ids are "{id_prefix}-{year}-{counter:06d}"
    start: datetime = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # when the first coil starts
    first_index: int = 0  # the coil counter's first value (a later period of the same line: larger)
    # order book
    product_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    campaign_mean: float = 6.0  # mean coils per coating campaign
    format_keep: float = 0.7  # chance that the next coil of a campaign keeps width and thickness
    coil_mass_t: tuple[float, float] = (8.0, 22.0)
    throughput_t_min: float = 1.15  # furnace capacity, tonnes per minute
    v_max_mpm: float = 160.0
    stop_rate: float = 0.01  # chance of a line stop (20–180 min) before a coil
    # air knife and control
    aim_margin: float = 0.04  # aim = triple-spot nominal per side · (1 + aim_margin) …
    aim_floor: float = 14.0  # … but at least min_side + aim_floor g/m²
    gap_sigma_mm: float = 0.3  # knife gap set-up scatter
    control_sigma: float = 0.02  # coil-level error of the controller (log coating, per side)
    wander_sigma: float = 0.012  # along-length control wander (log coating)
    wander_sections: float = 15.0  # correlation length of the wander, in sections
    ff_residual: tuple[float, float] = (0.03, 0.18)  # share of a settings step the feed-forward misses
    head_decay_m: tuple[float, float] = (20.0, 90.0)  # decay length of the head transient
    tail_residual: tuple[float, float] = (0.05, 0.35)
    tail_ramp_m: tuple[float, float] = (10.0, 40.0)
    # cross-width profile
    edge_build_up: float = 0.08  # extra coating on the edge sensors
    crossbow_sigma_mm: float = 0.35  # strip crossbow (at 0.8 mm; thinner strip bows more)
    tilt_sigma_mm: float = 0.25  # everyday knife/strip skew, edge to edge
    tilt_rate: float = 0.02  # coils run with a badly tilted knife …
    tilt_event_mm: tuple[float, float] = (1.0, 3.6)  # … skewed by this much
    lip_sigma: float = 0.01  # fixed lip irregularity of this line's knives
    # defects
    clog_rate: float = 0.045  # coils with a knife clog (thin stripe)
    clog_deep_share: float = 0.5  # share of clogs that are lodged particles (25–50 % thinner)
    heavy_streak_rate: float = 0.04  # coils with a harmless heavy streak
    # measurement
    noise_rel: float = 0.010
    noise_abs: float = 0.8
    drop_rate: float = 0.002
    burst_rate: float = 0.02
    stuck_rate: float = 0.012
    # labels
    trim_sections: int = 5
    min_run: int = 3
    borderline_band: float = 0.03
    label_noise: float = 0.01
    borderline_noise: float = 0.25
    # simulation
    fine: int = 4  # simulated rows per section
    drift: DriftConfig | None = None

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.id_prefix):
            raise ValueError("id_prefix must be 1–40 characters of [A-Za-z0-9._-]")
        if not 1 <= len(self.line) <= 64:  # what else a line may hold is the CoilMessage's rule (workflows)
            raise ValueError("line must be 1–64 characters")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if self.first_index < 0:
            raise ValueError("first_index must not be negative")
        if self.fine < 1:
            raise ValueError("fine must be at least 1")
        if not 0 <= self.label_noise <= 1 or not 0 <= self.borderline_noise <= 1:
            raise ValueError("label noise rates are probabilities")
        mix_probabilities(self.product_mix)

    @property
    def sensor_model(self) -> SensorModel:
        return SensorModel(self.noise_rel, self.noise_abs, self.drop_rate, self.burst_rate, self.stuck_rate)

    @property
    def label_rule(self) -> LabelRule:
        return LabelRule(
            self.trim_sections, self.min_run, self.borderline_band, self.label_noise, self.borderline_noise
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what a dataset's ``meta["config"]`` records)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["start"] = self.start.isoformat()
        d["drift"] = self.drift.to_dict() if self.drift is not None else None
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LineConfig:
        d = dict(d)
        if isinstance(d.get("start"), str):
            d["start"] = datetime.fromisoformat(d["start"])
        if isinstance(d.get("drift"), dict):
            drift = dict(d["drift"])
            if drift.get("sensors") is not None:
                drift["sensors"] = tuple(drift["sensors"])
            d["drift"] = DriftConfig(**drift)
        names = {f.name: f for f in fields(cls)}
        for k, v in list(d.items()):
            if k in names and isinstance(v, list):
                d[k] = tuple(v)
        return cls(**{k: v for k, v in d.items() if k in names})
