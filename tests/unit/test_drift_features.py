"""The drift features of ``ml/drift.py`` read what an engineer would read off a coil matrix."""

from __future__ import annotations

import numpy as np
import pytest

from ml.drift import BODY, FEATURE_NAMES, coil_features, left_out, sensor_column, sensor_of, silent_sensors
from ml.sim import LineConfig, LineSimulator


def _flat(level: float = 140.0, n: int = 1, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (level + noise * rng.standard_normal((n, 264, 18))).astype(np.float32)


def _one(X: np.ndarray) -> dict[str, float]:
    return {name: float(values[0]) for name, values in coil_features(X).items()}


def test_every_feature_is_named_and_per_coil() -> None:
    features = coil_features(_flat(n=3))
    assert tuple(features) == FEATURE_NAMES
    assert all(v.shape == (3,) for v in features.values())
    assert sensor_of("s07_spread") == 7 and sensor_of("worst_section") is None
    assert sensor_column(12, "min") == "s12_min"


def test_a_flat_coil_is_unremarkable() -> None:
    f = _one(_flat())
    for k in range(18):
        assert abs(f[sensor_column(k, "mean")]) < 0.2  # per cent off its side
        assert 0.8 < f[sensor_column(k, "spread")] < 1.25  # as noisy as its neighbours
        assert -2.0 < f[sensor_column(k, "min")] < 0  # the thinnest 3-section stretch, barely below
    assert f["coating"] == pytest.approx(140, abs=0.1)
    assert f["worst_section"] < 2
    assert f["edge_centre_ratio"] == pytest.approx(1, abs=0.01)
    assert f["top_bottom_balance"] == pytest.approx(1, abs=0.01)


def test_features_do_not_move_with_the_product() -> None:
    thin, thick = _one(_flat(60.0, noise=0.2)), _one(_flat(180.0, noise=0.6))
    for k in range(18):
        for feature in ("mean", "spread", "min"):
            name = sensor_column(k, feature)
            assert thin[name] == pytest.approx(thick[name], abs=0.5), name
    assert thin["coating"] == pytest.approx(60, abs=0.1) and thick["coating"] == pytest.approx(180, abs=0.1)


def test_a_gauge_off_calibration_shows_in_its_own_mean_and_spread() -> None:
    X = _flat()
    X[..., 4] *= 0.8  # reads 20 % low
    f = _one(X)
    assert f["s04_mean"] == pytest.approx(-20, abs=0.5)
    assert f["s04_min"] < -19
    assert f["s04_spread"] < 0.9  # a gain below 1 also shrinks its noise
    assert all(abs(f[sensor_column(k, "mean")]) < 0.5 for k in range(18) if k != 4)  # the side median holds
    assert f["worst_section"] > 19  # a full-length "stripe" that is not there
    assert f["top_bottom_balance"] < 1


def test_a_thin_stretch_is_the_worst_section_and_one_low_reading_is_not() -> None:
    X = _flat()
    X[0, 150:160, 2] *= 0.75  # ten sections 25 % thin on sensor 2
    X[0, 60, 11] *= 0.5  # one wild reading on sensor 11
    f = _one(X)
    assert f["s02_min"] == pytest.approx(-25, abs=1.5)
    assert f["s11_min"] > -2  # a stretch counts at its least thin section
    assert f["worst_section"] == pytest.approx(25, abs=1.5)
    position = (150 - BODY.start) / (BODY.stop - BODY.start - 3)
    assert f["worst_section_at"] == pytest.approx(position, abs=0.05)


def test_edges_and_sides() -> None:
    X = _flat()
    X[..., [0, 8, 9, 17]] *= 1.1  # edge build-up
    X[..., 9:] *= 0.95  # bottom knife a little further out
    f = _one(X)
    assert f["edge_centre_ratio"] == pytest.approx(1.1, abs=0.01)
    assert f["top_bottom_balance"] == pytest.approx(1 / 0.95, abs=0.01)


def test_dropped_readings_are_ignored_and_a_dead_sensor_is_unknown() -> None:
    X = _flat()
    X[0, ::7, 5] = np.nan
    X[0, :, 13] = np.nan  # dead over the whole coil
    f = _one(X)
    assert abs(f["s05_mean"]) < 0.3
    assert np.isnan(f["s13_mean"]) and np.isnan(f["s13_spread"]) and np.isnan(f["s13_min"])
    assert abs(f["s12_mean"]) < 0.3
    assert all(np.isfinite(v) for k, v in f.items() if sensor_of(k) != 13)


def test_a_sensor_left_out_of_the_side_level_moves_no_other_feature_when_it_dies() -> None:
    """A drift comparison leaves a dead gauge out of its side's level on both sides: then its death changes no
    other column, where the median of the other eight had moved every feature of the side."""
    X = LineSimulator(LineConfig(seed=2)).dataset(20).X
    dead = X.copy()
    dead[:, :, 4] = np.nan
    assert silent_sensors(dead) == {4} and silent_sensors(X) == set()
    alive, gone = coil_features(X, without={4}), coil_features(dead, without={4})
    for name in FEATURE_NAMES:
        if sensor_of(name) != 4:
            np.testing.assert_allclose(gone[name], alive[name], err_msg=name)
    moved = coil_features(dead)["s03_mean"] - coil_features(X)["s03_mean"]
    assert np.abs(moved).max() > 0.05  # what a side level over whichever sensors read does


def test_a_sensor_silent_on_half_the_coils_counts_as_dead() -> None:
    X = _flat(n=4)
    X[:2, :, 7] = np.nan  # two of four coils
    X[0, :, 11] = np.nan  # one of four
    X[:, BODY.start - 1, 12] = np.nan  # outside the body only: it reads where it counts
    assert silent_sensors(X) == {7} and silent_sensors(X, share=0.25) == {7, 11}
    gone = X.copy()
    gone[:, :, 9:] = np.nan  # the bottom side silent as a whole: nothing to level it against, and nothing left out
    assert left_out(X, gone) == {7}
    top_away = X.copy()
    top_away[:, :, :9] = np.nan  # the reference's top frame silent: the window's one dead gauge is still left out
    window = _flat(n=4)
    window[:, :, 4] = np.nan
    assert left_out(top_away, window) == {4}
