"""ReTrain's recalibration of the history: the gauges that drifted are found, by how much, and nothing else moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from ml.dataset import CoilDataset
from ml.recalibration import estimate_gains, sensor_offsets
from ml.sim import DriftConfig, LineConfig, LineSimulator
from ml.sim.drift import SENSOR_DRIFT_GAINS
from workflows.ports import LabelledCoil
from workflows.retrain import RetrainConfig, recalibrated

N = 240


def _line(scenario: str | None) -> tuple[LineSimulator, CoilDataset, CoilDataset]:
    """``N`` coils of one line, then ``N`` more after ``scenario`` set in (each line has its own cross profile,
    so history and recent coils come from the same one)."""
    sim = LineSimulator(LineConfig(seed=7, drift=DriftConfig(scenario, start=N, ramp=0)))
    return sim, sim.dataset(N), sim.dataset(N)


@pytest.fixture(scope="module")
def history() -> CoilDataset:
    return _line(None)[1]


def _ok(ds: CoilDataset) -> np.ndarray:
    return ds.X[ds.y == 0]


def _labelled(ds: CoilDataset) -> list[LabelledCoil]:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    return [
        LabelledCoil(str(c), x, int(y), t0, t0 + timedelta(minutes=i))
        for i, (c, x, y) in enumerate(zip(ds.coil_id, ds.X, ds.y, strict=True))
    ]


def test_the_drifted_gauges_and_their_gains_are_found(history: CoilDataset) -> None:
    sim, _, drifted = _line("sensor-drift")
    gains = estimate_gains(_ok(drifted), _ok(history))
    assert gains is not None
    assert sorted(gains.moved) == sorted(sim.drifted_sensors)
    found = [gains.moved[k] for k in sim.drifted_sensors]
    assert found == pytest.approx([1 + g for g in SENSOR_DRIFT_GAINS], abs=0.01)
    # the history, recalibrated, reads as the drifted line does
    profile = [np.nanmedian(sensor_offsets(X), axis=0) for X in (gains.apply(history.X), drifted.X)]
    assert profile[0] == pytest.approx(profile[1], abs=0.01)


@pytest.mark.parametrize("scenario", [None, "product-mix", "new-defect"])
def test_no_gauge_moves_where_only_the_product_or_the_defects_changed(history: CoilDataset, scenario: str) -> None:
    later = _line(scenario)[2]
    gains = estimate_gains(_ok(later), _ok(history))
    assert gains is not None and gains.moved == {}
    assert np.array_equal(gains.apply(history.X), history.X, equal_nan=True)


def test_a_dead_or_silent_gauge_is_reported_and_left_alone(history: CoilDataset) -> None:
    """A detector reading nothing is broken, not off calibration: scaling the history's sensor to nothing would
    stay in every later history, long after the gauge is repaired."""
    sim, _, drifted = _line("sensor-drift")
    broken = _ok(drifted).copy()
    broken[:, :, 0] = 2.0  # stuck low: a dead detector's constant
    broken[:, :, 17] = np.nan  # silent over the whole coil
    gains = estimate_gains(broken, _ok(history))
    assert gains is not None and gains.implausible == (0, 17)
    assert gains.gains[0] == gains.gains[17] == 1.0 and sorted(gains.moved) == sorted(sim.drifted_sensors)
    assert gains.summary()["implausible"] == ["s00", "s17"]


def test_too_few_coils_say_nothing(history: CoilDataset) -> None:
    assert estimate_gains(_ok(history)[:29], _ok(history)) is None
    assert estimate_gains(_ok(history), _ok(history)[:29]) is None


def test_retrain_recalibrates_a_copy_of_the_history_from_the_newest_ok_coils(history: CoilDataset) -> None:
    sim, _, drifted = _line("sensor-drift")
    before = history.X.copy()
    moved, gains = recalibrated(history, _labelled(drifted), RetrainConfig())
    assert gains is not None and sorted(gains.moved) == sorted(sim.drifted_sensors)
    assert gains.n_recent == RetrainConfig().recalibration_coils
    assert np.array_equal(history.X, before, equal_nan=True)  # the champion's history file is not touched
    assert moved is not history and list(moved.coil_id) == list(history.coil_id)
    assert gains.summary()["gains"].keys() == {f"s{k:02d}" for k in sim.drifted_sensors}

    # NOK coils do not vote on the calibration: only NOK coils newly labelled, nothing is estimated
    nok_only = [c for c in _labelled(drifted) if c.label == 1]
    for labelled, config in ((nok_only, RetrainConfig()), (_labelled(drifted), RetrainConfig(recalibrate=False))):
        same, none = recalibrated(history, labelled, config)
        assert same is history and none is None
    assert recalibrated(None, _labelled(drifted), RetrainConfig()) == (None, None)
