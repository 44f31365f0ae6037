"""ReTrain's recalibration of the history: the gauges that drifted are found, by how much, and nothing else moves."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import sql_retrain, stripe_coils
from score_scenario import assessed_coil

from ml.assessors.base import AssessBatch
from ml.assessors.cnn import CnnAssessor
from ml.dataset import CoilDataset
from ml.ensemble import MemberVote
from ml.matrix import N_SENSORS
from ml.normalize import Normalizer
from ml.recalibration import estimate_gains, sensor_offsets
from ml.sim import DriftConfig, LineConfig, LineSimulator
from ml.sim.drift import SENSOR_DRIFT_GAINS
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.repositories import SqlCoilStore, SqlFeedbackStore, SqlModelRegistry
from workflows.ports import LabelledCoil
from workflows.retrain import RetrainConfig, RetrainOutcome, recalibrated
from workflows.training import load_model, register

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


# ----------------------------------------------------------------------------- the champion reading through the gains


def test_a_normalizer_with_gauge_gains_reads_todays_coils_as_the_old_gauges_did(history: CoilDataset) -> None:
    plain = Normalizer.fit(history.X)
    gains = np.ones(N_SENSORS)
    gains[[3, 12]] = 0.8, 1.15
    through = replace(plain, gauge_gains=tuple(gains))
    today = history.X * gains.astype(np.float32)
    assert through.transform(today) == pytest.approx(plain.transform(history.X), abs=1e-5)
    assert not np.allclose(plain.transform(today), plain.transform(history.X), atol=1e-2)
    assert Normalizer.from_dict(through.to_dict()) == through and "gauge_gains" not in plain.to_dict()
    assert through.without_gauge_gains() == plain
    for wrong in ((1.0,) * 17, (1.0,) * 17 + (0.0,)):
        with pytest.raises(ValueError, match="18 positive factors"):
            replace(plain, gauge_gains=wrong)


def _store_labelled(engine, model: str, model_id: int, coils: CoilDataset) -> None:
    """The coils as AssessCoils stored them (their matrices as measured) and the operators' verdicts, oldest first."""
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    SqlCoilStore(engine).save_assessed(
        [
            replace(assessed_coil(str(c), [MemberVote(model, 1, "OK", 0.5, 0.5)], t0 + timedelta(minutes=i)), matrix=x)
            for i, (c, x) in enumerate(zip(coils.coil_id, coils.X, strict=True))
        ],
        {(model, 1): model_id},
    )
    feedback = SqlFeedbackStore(engine)
    for coil_id, y in zip(coils.coil_id, coils.y, strict=True):
        feedback.add(str(coil_id), "NOK" if y else "OK", "anna")


def test_after_a_gauge_drift_the_champion_reading_through_the_gains_replaces_a_worse_retrained_one(
    tmp_path: Path,
) -> None:
    """Two gauges drift (one reads 20 % low: a full-length 'thin stripe' on every coil). The retrained challenger
    is wrecked on purpose, so the champion reading through the gains must be the one put forward, promoted, and
    stored with the gains and the champion's own history; retrained from it later, the challenger reads live
    coils as they come and the gains are again relative to that history, not added to the first ones."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    registry = SqlModelRegistry(engine)
    history = stripe_coils(160, 0.2)
    champion = CnnAssessor({"epochs": 4, "seed": 0}, name="plain")
    champion.fit(history, device="cpu")
    first = register(champion, registry, tmp_path, status="active", dataset=history)
    drift = np.ones(N_SENSORS, np.float32)
    drift[[3, 12]] = 0.8, 1.15
    today = stripe_coils(150, 0.2, seed=5)
    today.X = today.X * drift
    _store_labelled(engine, "plain", first.id, today)

    def retrain(**config: object) -> RetrainOutcome:
        runner = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(**config))  # type: ignore[arg-type]
        return runner.run(["plain"], force=True)[0]

    wrecking = {"epochs": 1, "lr": 0.5, "class_weight_nok": 0.01, "augment": False}
    outcome = retrain(fit_overrides=wrecking)
    candidates = outcome.metrics["candidates"]
    assert candidates["chosen"] == "read_through" and candidates["read_through"] > candidates["retrained"], outcome
    assert outcome.status == "promoted" and "reading through the gauges' gains" in outcome.reason, outcome
    holdout = outcome.metrics["holdout"]
    assert holdout["metric"] == "f1_nok" and holdout["challenger"] > holdout["champion"]
    [active] = registry.active_models()
    served = load_model(active, tmp_path)
    assert served.normalizer is not None and served.normalizer.gauge_gains is not None
    assert served.normalizer.gauge_gains == pytest.approx(drift, abs=0.02)
    assert served.training_data["path"] == champion.training_data["path"]  # the champion's history, untouched
    assert served.training_data["recalibration"]["applied_to"] == "inputs"
    assert served.training_data["recalibration"]["gains"] == outcome.metrics["data"]["recalibration"]["gains"]
    # the same network, now reading today's coils as the champion read them before the drift
    before = champion.predict(AssessBatch(today.X / drift))[0]
    assert served.predict(AssessBatch(today.X))[0] == pytest.approx(before, abs=0.05)

    # turned off, only the retrained challenger is offered; warm-started from the served model, it reads live
    # coils as they come, and the gains are read against the history again (the same gains, not compounded)
    again = retrain(read_through=False, fit_overrides={"epochs": 1}, margin=1.0)  # margin 1: always promoted
    assert again.status == "promoted" and again.metrics["candidates"] is None, again
    assert again.metrics["data"]["recalibration"]["gains"] == outcome.metrics["data"]["recalibration"]["gains"]
    [active] = registry.active_models()
    assert active.version == 3 and load_model(active, tmp_path).normalizer.gauge_gains is None
    engine.dispose()
