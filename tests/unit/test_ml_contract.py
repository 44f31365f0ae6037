"""The assessor contract: normalization, calibration, augmentation, ensemble, manifest, entry points."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import as_written_by_release_1, edit_manifest, legacy_sha256, stripe_coils

from ml.assessors.base import AssessBatch, Assessor, calibrate
from ml.assessors.manifest import ArtifactError, Manifest
from ml.assessors.matrix_fit import start_matrix_fit
from ml.assessors.registry import UnknownAssessor, available, create, load_artifact
from ml.dataset import INIT_VALIDATION_CURRENT, LEARNED_BY_INIT, CoilDataset
from ml.ensemble import ABSTAIN, MIN_SHARD_COILS, Ensemble, Member, share_threads
from ml.evaluation.metrics import best_threshold, binary_metrics, cost_threshold
from ml.normalize import Normalizer, fill_dropped
from ml.training.augment import augment_batch
from ml.training.loop import epoch_indices
from ml.training.splits import split_keeping, stratified_split
from workflows.ports import LabelledCoil, ModelRecord
from workflows.retrain import combine
from workflows.training import keep_training_data, load_kept_data, load_model, training_history

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_normalizer_uses_global_limits_fills_drops_and_clips() -> None:
    X = np.full((2, 264, 18), 100.0, dtype=np.float32)
    X[1] = 200.0
    X[0, 5, 3] = np.nan
    X[1, :, 7] = np.nan  # a sensor dropped for the whole coil
    X[0, 0, 0] = 10_000.0  # a wild reading must not stretch the scale
    norm = Normalizer.fit(X)
    assert norm.low == pytest.approx(75.0) and norm.high == pytest.approx(225.0)  # bulk ± a quarter of its span
    out = norm.transform(X)
    assert out.dtype == np.float32 and not np.isnan(out).any()
    assert out.min() >= 0 and out.max() <= 1 and out[0, 0, 0] == 1.0  # clipped
    assert out[0, 5, 3] == pytest.approx(1 / 6, abs=1e-3)  # filled from its own sensor's values
    assert out[1, 0, 7] == pytest.approx(5 / 6)  # whole sensor dropped: the coil's mean
    assert Normalizer.from_dict(norm.to_dict()) == norm


def test_fill_dropped_keeps_a_stripe_a_stripe() -> None:
    X = np.full((1, 264, 18), 140.0, dtype=np.float32)
    X[0, :, 4] = 100.0
    X[0, 50:60, 4] = np.nan
    assert np.allclose(fill_dropped(X)[0, 50:60, 4], 100.0)


def test_calibration_moves_the_threshold_to_one_half_and_keeps_order() -> None:
    raw = np.array([0.01, 0.2, 0.3, 0.9, np.nan])
    out = calibrate(raw, 0.2)
    assert out[1] == pytest.approx(0.5)
    assert np.all(np.diff(out[:4]) > 0) and np.isnan(out[4])


def test_best_threshold_prefers_the_f1_optimum() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.05, 0.1, 0.15, 0.3, 0.35, 0.4])
    t = best_threshold(y, scores)
    assert 0.3 < t <= 0.35
    assert binary_metrics(y, scores, t)["f1_nok"] == 1.0


def test_cost_threshold_trades_false_alarms_for_missed_nok_at_the_class_weight() -> None:
    # one NOK coil scores low, among three OK coils: F1 gives it up, a 5:1 cost catches it (3 alarms < 5)
    y = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.2, 0.25, 0.3, 0.35, 0.9, 0.92, 0.95])
    assert best_threshold(y, scores) > 0.35
    t = cost_threshold(y, scores, nok_cost=5.0)
    assert 0.05 < t <= 0.2
    assert cost_threshold(y, scores, nok_cost=2.0) > 0.35  # at 2:1 three false alarms cost more than one miss
    assert cost_threshold(np.zeros(4), scores[:4], nok_cost=5.0) == 0.5  # no NOK to learn from


def test_augmentation_flips_each_side_on_its_own_and_stays_in_range() -> None:
    x = np.zeros((64, 264, 18), dtype=np.float32)
    x[:, :, 0] = 1.0  # operator-side edge of the top side
    out = augment_batch(x, np.random.default_rng(0), max_shear_sections=0, noise_sigma=0)
    hot = {int(np.argmax(out[i].mean(axis=0))) for i in range(len(out))}
    assert hot <= {0, 8, 9, 17}  # an edge stays an edge; a flip never moves it into the strip's centre
    assert len(hot) > 1
    noisy = augment_batch(x, np.random.default_rng(1))
    assert noisy.min() >= 0 and noisy.max() <= 1 and noisy.shape == x.shape


def test_a_gain_error_scales_whole_sensors_about_zero_coating() -> None:
    """A gauge off calibration reads every section of its sensor the same share too low or too high; the
    normalized scale has an offset, so the gain must pivot on 0 g/m², not on 0 of the scale."""
    limits = Normalizer(low=20.0, high=220.0)
    coating = np.random.default_rng(2).uniform(60.0, 180.0, size=(32, 264, 18)).astype(np.float32)
    x = limits.transform(coating)
    zero = -limits.low / (limits.high - limits.low)
    plain = dict(p_flip=0.0, max_shear_sections=0, noise_sigma=0.0)
    out = augment_batch(x, np.random.default_rng(3), gain_sigma=0.03, zero=zero, **plain)
    gain = (out * (limits.high - limits.low) + limits.low) / coating
    np.testing.assert_allclose(gain, np.broadcast_to(gain[:, :1, :], gain.shape), rtol=1e-4)  # one per coil and sensor
    assert 0.925 - 1e-6 <= gain.min() < 0.98 and 1.02 < gain.max() <= 1.075 + 1e-6
    assert len(np.unique(gain[:, 0, :].round(6))) > 100  # drawn per coil and sensor, not shared
    np.testing.assert_array_equal(augment_batch(x, np.random.default_rng(3), **plain), x)  # off by default


@pytest.mark.parametrize("kind", ["cnn", "yolo", "effnet", "siamese"])
def test_every_matrix_assessor_trains_with_its_gain_error_setting(kind: str) -> None:
    coils = stripe_coils(40, seed=1)
    fit = start_matrix_fit(create(kind, {"gain_jitter": 0.05}), coils, None, 0.2, np.random.default_rng(0))
    assert fit.augment is not None and fit.augment.keywords["gain_sigma"] == 0.05
    limits = Normalizer.fit(coils.X)
    assert fit.augment.keywords["zero"] == pytest.approx(-limits.low / (limits.high - limits.low))
    assert create(kind).settings.gain_jitter == 0.03
    plain = create(kind, {"augment": False})
    assert start_matrix_fit(plain, coils, None, 0.2, np.random.default_rng(0)).augment is None


def test_splits_and_oversampling_keep_nok_everywhere() -> None:
    y = np.array([0] * 95 + [1] * 5)
    train, val = stratified_split(y, 0.2, np.random.default_rng(0))
    assert y[val].sum() >= 1 and y[train].sum() >= 1 and len(set(train) & set(val)) == 0
    idx = epoch_indices(y, 3.0, np.random.default_rng(0))
    assert np.sum(y[idx] == 1) == 15 and np.sum(y[idx] == 0) == 95


def test_a_coil_repeated_for_weight_stays_on_one_side_of_the_split() -> None:
    """ReTrain's training set repeats each operator-labelled coil; validation must not see a copy of a
    training coil, and holds each of its coils once."""
    coil_id = np.array([f"H{i}" for i in range(200)] + [f"F{i}" for i in range(30)] * 3)
    y = np.array([0] * 190 + [1] * 10 + ([0] * 25 + [1] * 5) * 3)
    train, val = stratified_split(y, 0.2, np.random.default_rng(0), groups=coil_id)
    assert not set(coil_id[train]) & set(coil_id[val])
    assert len(set(coil_id[val])) == len(val) and y[val].sum() >= 1
    assert sorted(set(coil_id[train]) | set(coil_id[val])) == sorted(set(coil_id))
    unique = np.array([f"U{i}" for i in range(100)])  # no repeats: exactly the row-wise split
    y100 = np.array([0] * 95 + [1] * 5)
    for a, b in zip(
        stratified_split(y100, 0.2, np.random.default_rng(0), groups=unique),
        stratified_split(y100, 0.2, np.random.default_rng(0)),
        strict=True,
    ):
        assert np.array_equal(a, b)


def test_kept_coils_stay_on_their_side_and_the_rest_is_drawn() -> None:
    coil_id = np.array([f"H{i}" for i in range(100)] + [f"F{i}" for i in range(20)] * 3)
    y = np.array(([0] * 9 + [1]) * 10 + ([0] * 18 + [1] * 2) * 3)
    in_val = np.isin(coil_id, [f"H{i}" for i in range(0, 100, 10)] + ["H9", "F0"])  # F0 is repeated three times
    in_train = ~in_val & np.char.startswith(coil_id, "H")
    train, val = split_keeping(y, 0.25, np.random.default_rng(0), coil_id, in_train, in_val)
    assert set(coil_id[val]) >= set(coil_id[in_val]) and not set(coil_id[val]) & set(coil_id[in_train])
    assert len(set(coil_id[val])) == len(val)  # each coil once, F0 too
    drawn = set(coil_id[val]) - set(coil_id[in_val])
    assert drawn and all(c.startswith("F") for c in drawn) and y[np.isin(coil_id, list(drawn))].any()
    assert not set(coil_id[train]) & set(coil_id[val]) and set(coil_id[train]) | set(coil_id[val]) == set(coil_id)
    with pytest.raises(ValueError, match="both"):
        split_keeping(y, 0.25, np.random.default_rng(0), coil_id, in_val, in_val)


def _warm_start_case() -> tuple[CoilDataset, Assessor, CoilDataset, CoilDataset]:
    """A champion trained on a history, and ReTrain's data: its history plus operator feedback counted three
    times, the coils it learned marked (its validation coils are not)."""
    history = stripe_coils(120, seed=1)
    champion = create("cnn", {"epochs": 1, "batch_size": 32, "seed": 3})
    champion.fit(history, device="cpu")
    validated = set(champion.training_data["validation_coils"])
    assert champion.training_data["validation"] == {"rule": "drawn", "coils": len(validated)}
    assert validated and validated < set(history.coil_id)
    feedback = stripe_coils(60, nok_share=0.2, seed=2)
    data = CoilDataset.concat([history, feedback, feedback, feedback])
    data.columns[LEARNED_BY_INIT] = (
        ~np.isin(data.coil_id, list(validated)) & np.isin(data.coil_id, history.coil_id)
    ).tolist()
    return history, champion, feedback, data


def test_a_warm_started_model_is_validated_on_the_coils_new_to_its_start() -> None:
    """ReTrain warm-starts a challenger from the champion on the champion's data plus operator feedback. A
    validation coil the champion trained on rewards what its weights remember, and validation on the old
    coils stops the training before it has learned the drift it is retrained for."""
    history, champion, feedback, data = _warm_start_case()
    validated = set(champion.training_data["validation_coils"])
    learned = set(history.coil_id) - validated
    fit = start_matrix_fit(create("cnn"), data, champion, 0.15, np.random.default_rng(0))
    val_coils = set(data.coil_id[fit.val])
    assert val_coils <= set(feedback.coil_id) and 0 < len(val_coils) == len(fit.val) < 60
    assert fit.y[fit.val].sum() > 0 and fit.split["coils_new"] == len(val_coils)
    assert fit.split["rule"] == "warm start: a share of the coils new to the starting model"
    assert not set(data.coil_id[fit.train]) & val_coils and set(data.coil_id[fit.train]) >= set(history.coil_id)

    unmarked = CoilDataset.concat([history, feedback])  # not told what the champion learned: drawn, as before
    assert start_matrix_fit(create("cnn"), unmarked, champion, 0.15, np.random.default_rng(0)).split["rule"] == (
        f"drawn, although warm-started: no {LEARNED_BY_INIT} column"
    )
    ok_only = feedback.subset(np.flatnonzero(feedback.y == 0))  # the new coils hold no NOK to validate on
    no_new_nok = CoilDataset.concat([history, ok_only])
    no_new_nok.columns[LEARNED_BY_INIT] = np.isin(no_new_nok.coil_id, list(learned)).tolist()
    joined = start_matrix_fit(create("cnn"), no_new_nok, champion, 0.15, np.random.default_rng(0))
    assert joined.split["kept"] == len(validated) and validated <= set(no_new_nok.coil_id[joined.val])
    assert joined.split["rule"].endswith("(no new NOK)")
    assert not set(no_new_nok.coil_id[joined.val]) & learned and joined.y[joined.val].sum() > 0
    champion.training_data = {**champion.training_data, "validation_coils": []}  # a manifest from before the list:
    no_new_nok.columns[LEARNED_BY_INIT] = np.isin(no_new_nok.coil_id, history.coil_id).tolist()  # all history learned
    fallback = start_matrix_fit(create("cnn"), no_new_nok, champion, 0.15, np.random.default_rng(0))
    assert "no NOK coil the starting model did not learn" in fallback.split["rule"]
    assert fallback.y[fallback.val].sum() > 0


def test_after_a_recalibration_the_starts_validation_coils_validate_too() -> None:
    """Where ReTrain put the champion's history in the gauges' current calibration, the champion's own validation
    coils (a few dozen NOK) speak for the line as it is now and validate beside a share of the new ones."""
    history, champion, feedback, data = _warm_start_case()
    validated = set(champion.training_data["validation_coils"])
    learned = set(history.coil_id) - validated
    data.meta[INIT_VALIDATION_CURRENT] = True
    fit = start_matrix_fit(create("cnn"), data, champion, 0.15, np.random.default_rng(0))
    val_coils = set(data.coil_id[fit.val])
    new = val_coils & set(feedback.coil_id)
    assert val_coils == validated | new and len(val_coils) == len(fit.val)  # each coil once
    assert 0 < len(new) < 60 and fit.split["coils_new"] == len(new) and fit.split["kept"] == len(validated)
    assert fit.y[fit.val].sum() > 0 and not val_coils & learned and "recalibrated" in fit.split["rule"]
    assert not set(data.coil_id[fit.train]) & val_coils and set(data.coil_id[fit.train]) >= learned


def test_cnn_trains_saves_loads_and_predicts_identically(tmp_path: Path) -> None:
    data = stripe_coils(240, seed=1)
    cnn = create("cnn", {"epochs": 3, "batch_size": 32, "seed": 3})
    report = cnn.fit(data, device="cpu")
    assert report.epochs_run >= 1 and "validation" in cnn.metrics
    test = stripe_coils(60, seed=2)
    p, c = cnn.predict(AssessBatch(test.X))
    assert p.shape == (60,) and np.all((c >= 0.5) & (c <= 1))
    manifest = cnn.save(tmp_path / "cnn")
    assert manifest.normalization and manifest.training_data["n_coils"] == 240
    assert manifest.settings["epochs"] == 3 and set(manifest.files) == {"weights.pt"}
    again = load_artifact(tmp_path / "cnn")
    p2, c2 = again.predict(AssessBatch(test.X))
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(c, c2)


def test_cnn_training_is_reproducible_by_seed() -> None:
    data = stripe_coils(120, seed=4)
    runs = []
    for _ in range(2):
        cnn = create("cnn", {"epochs": 1, "batch_size": 32, "seed": 11})
        cnn.fit(data, device="cpu")
        runs.append(cnn.predict(AssessBatch(data.X[:20]))[0])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(80), device="cpu")
    cnn.save(tmp_path)
    weights = tmp_path / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(tmp_path)


def test_a_kept_training_set_changed_on_disk_is_refused(tmp_path: Path) -> None:
    """ReTrain trains the challenger on the champion's kept history, and the drift report compares with it: a file
    replaced after it was kept must not become training data or the reference unnoticed."""
    data = stripe_coils(40)
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.training_data = {"path": keep_training_data(data, tmp_path)}
    assert training_history(cnn, tmp_path).summary()["sha256"] == data.summary()["sha256"]
    stripe_coils(40, seed=9).save(tmp_path / cnn.training_data["path"])  # other coils under the same name
    with pytest.raises(ArtifactError, match="was changed after it was kept"):
        training_history(cnn, tmp_path)
    with pytest.raises(ArtifactError, match="was changed after it was kept"):  # the drift report's reference
        load_kept_data(tmp_path, cnn.training_data["path"])


@pytest.mark.parametrize("change", ["coil_id", "learned_by_init"])
def test_a_kept_training_set_with_the_same_matrices_but_other_coils_or_columns_is_refused(
    tmp_path: Path, change: str
) -> None:
    """ReTrain tells the operators' feedback from the history by coil id and keeps the coils the starting model
    learned from out of validation by a column: those change what a challenger is judged on, so they are part
    of what the name vouches for, not only X and y."""
    data = stripe_coils(40)
    data.columns["learned_by_init"] = [False] * len(data)
    relative = keep_training_data(data, tmp_path)
    assert load_kept_data(tmp_path, relative).content_digest() == data.content_digest()
    if change == "coil_id":
        data.coil_id = np.roll(data.coil_id, 1)
    else:
        data.columns["learned_by_init"] = [True] * len(data)
    data.save(tmp_path / relative)
    with pytest.raises(ArtifactError, match="was changed after it was kept"):
        load_kept_data(tmp_path, relative)


def test_a_training_set_kept_by_an_earlier_release_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files kept before the name covered the whole content are named by the digest of X and y: those two are
    still checked."""
    data = stripe_coils(40)
    relative = f"data/{data.summary()['sha256'][:20]}.npz"
    data.save(tmp_path / relative)
    assert load_kept_data(tmp_path, relative).content_digest() == data.content_digest()
    assert "kept by an earlier release" in caplog.text
    data.X[0, 0, 0] += 1.0
    data.save(tmp_path / relative)
    with pytest.raises(ArtifactError, match="was changed after it was kept"):
        load_kept_data(tmp_path, relative)


def test_a_retrain_training_set_reads_back_under_its_own_name(tmp_path: Path) -> None:
    """What ReTrain keeps (history from disk, feedback coils, the columns and nested meta ``combine`` writes, meta
    keys that are not strings) must match its name when read back, or ReTrain would refuse its own history."""
    history = load_kept_data(tmp_path, keep_training_data(stripe_coils(40), tmp_path))
    history.meta["by_gauge"] = {3: np.float32(1.5), 10: (1, 2)}  # int keys and numpy values, as a writer may add
    feedback = [
        LabelledCoil(f"F-{k}", stripe_coils(1, seed=k).X[0], k % 2, None, datetime(2026, 12, 6, tzinfo=UTC))
        for k in range(6)
    ]
    data = combine(history, feedback, 3, [history.coil_id[0]], recalibrated=True)
    relative = keep_training_data(data, tmp_path)
    assert load_kept_data(tmp_path, relative).content_digest() == data.content_digest()
    assert not list((tmp_path / "data").glob(".*"))  # no temporary file left behind


def test_a_kept_training_set_cut_short_by_a_crash_is_written_again(tmp_path: Path, caplog) -> None:
    """A power cut after the rename can leave the file empty or truncated under its digest's name. Keeping the
    same set again (the next registration with it) must repair it, not find the name and trust it."""
    data = stripe_coils(40)
    relative = keep_training_data(data, tmp_path)
    path = tmp_path / relative
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception):  # noqa: B017  (whatever numpy makes of half a zip)
        load_kept_data(tmp_path, relative)
    assert keep_training_data(data, tmp_path) == relative
    assert load_kept_data(tmp_path, relative).content_digest() == data.content_digest()
    assert "unreadable" in caplog.text


def test_a_manifest_of_another_kind_is_refused(tmp_path: Path) -> None:
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(80), device="cpu")
    cnn.save(tmp_path)
    manifest = Manifest.read(tmp_path)
    manifest.kind = "nonexistent"
    manifest.write(tmp_path)
    with pytest.raises(ArtifactError, match="nonexistent"):
        load_artifact(tmp_path)


@pytest.fixture(scope="module")
def tiny_cnn():
    """One quickly trained CNN for the manifest tests: they edit copies of its saved artifact, never the model."""
    cnn = create("cnn", {"epochs": 1, "batch_size": 32, "seed": 3}, name="tiny")
    cnn.fit(stripe_coils(80), device="cpu")
    return cnn


def _record(directory: Path, sha256: str) -> ModelRecord:
    """The registry row of the artifact in ``directory`` (tiny v1), as the `models` table would return it."""
    return ModelRecord(
        id=1, name="tiny", kind="cnn", version=1, status="active", artifact_uri=str(directory), sha256=sha256
    )


def _higher_threshold(content: dict) -> None:
    content["calibration"]["threshold"] = 0.999


def _wider_normalization(content: dict) -> None:
    content["normalization"]["high"] *= 3


def _other_settings(content: dict) -> None:
    content["settings"]["threshold_rule"] = "f1"


MANIFEST_EDITS = [_higher_threshold, _wider_normalization, _other_settings]


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_an_edited_manifest_is_refused(tiny_cnn, edit, tmp_path: Path) -> None:
    """The threshold, the normalization and the settings are read from the manifest: an edit changes predictions
    as an edited weights file would. A plain load notices through ``artifact_sha256``; a forger who recomputes
    that passes a plain load, and only the registry row (the anchor outside the folder) refuses the artifact."""
    record = _record(tmp_path, tiny_cnn.save(tmp_path).weights_sha256)
    edit_manifest(tmp_path, edit)
    with pytest.raises(ArtifactError, match=r"manifest\.json was changed after it was saved"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="changed after it was saved"):
        load_model(record, tmp_path)
    resealed = Manifest.read(tmp_path)
    resealed.seal()
    resealed.write(tmp_path)
    load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match=r"tiny v1: .* is not the artifact registered"):
        load_model(record, tmp_path)


def test_a_manifest_written_by_an_older_release_still_loads(tiny_cnn, tmp_path: Path) -> None:
    """Registry rows of models saved before integrity version 2 hold the weight-files-only checksum."""
    manifest = tiny_cnn.save(tmp_path)
    edit_manifest(tmp_path, as_written_by_release_1)
    old = Manifest.read(tmp_path)
    assert old.integrity == 1 and old.weights_sha256 == legacy_sha256(manifest.files)
    loaded = load_model(_record(tmp_path, legacy_sha256(manifest.files)), tmp_path)
    coils = stripe_coils(20, seed=5).X
    np.testing.assert_array_equal(loaded.predict(AssessBatch(coils))[0], tiny_cnn.predict(AssessBatch(coils))[0])


@pytest.mark.parametrize("edit", [None, *MANIFEST_EDITS])
def test_a_manifest_downgraded_to_version_1_is_refused_by_the_registry(tiny_cnn, edit, tmp_path: Path) -> None:
    """A version 1 manifest has nothing to check its content against, so a plain load refuses it and only a
    caller that compares the registry's checksum opts in; the registry recorded the version 2 checksum, which the
    version 1 definition never produces."""
    record = _record(tmp_path, tiny_cnn.save(tmp_path).weights_sha256)
    edit_manifest(tmp_path, as_written_by_release_1)
    if edit:
        edit_manifest(tmp_path, edit)
    with pytest.raises(ArtifactError, match="is of the old format"):
        load_artifact(tmp_path)
    load_artifact(tmp_path, allow_legacy=True)
    with pytest.raises(ArtifactError, match=r"tiny v1: .* manifest \(integrity version 1\)"):
        load_model(record, tmp_path)


def test_a_registry_row_without_a_checksum_is_refused(tiny_cnn, tmp_path: Path) -> None:
    """Without the registry's checksum a downgraded manifest would pass unnoticed: no checksum, no load."""
    tiny_cnn.save(tmp_path)
    with pytest.raises(ArtifactError, match="tiny v1 has no checksum in the registry"):
        load_model(_record(tmp_path, ""), tmp_path)


def test_the_artifact_checksum_covers_the_manifest_content_not_its_layout() -> None:
    files = {"weights.pt": "a" * 64, "references.pt": "b" * 64}
    manifest = Manifest(kind="selfcon_margin", name="m", training_data={"classes": ["ok", "scratch"]}, files=files)
    content = dict(reversed(json.loads(manifest.model_dump_json()).items()))
    content["files"] = dict(reversed(files.items()))
    reread = Manifest.model_validate_json(json.dumps(content, indent=4))
    assert reread.weights_sha256 == manifest.weights_sha256  # key order, indentation, files' order: not content
    for change in [
        {"training_data": {"classes": ["scratch", "ok"]}},  # which output is the defect-free class
        {"calibration": {"threshold": 0.4}},
        {"code_version": "coilguard 0.0"},
        {"files": {**files, "references.pt": "c" * 64}},
    ]:
        assert manifest.model_copy(update=change).weights_sha256 != manifest.weights_sha256, change


def test_unknown_assessor_names_the_installed_ones() -> None:
    with pytest.raises(UnknownAssessor, match="cnn"):
        create("no-such-model")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="epochs"):
        create("cnn", {"epochs": 0})
    with pytest.raises(ValueError, match="extra"):
        create("cnn", {"no_such_setting": 1})
    with pytest.raises(ValueError, match="gain_jitter"):
        create("siamese", {"gain_jitter": -0.01})


class _Fixed:
    """A stand-in assessor with fixed outputs, to pin the ensemble arithmetic."""

    consumes = "matrix"

    def __init__(self, name: str, p: list[float], consumes: str = "matrix") -> None:
        self.name, self.version, self._p, self.consumes = name, 1, np.array(p, dtype=np.float32), consumes

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        return self._p, np.where(np.isnan(self._p), np.nan, np.maximum(self._p, 1 - self._p))


def test_ensemble_averages_votes_and_records_abstentions() -> None:
    members = [
        Member(_Fixed("a", [0.9, 0.3, 0.6])),  # type: ignore[arg-type]
        Member(_Fixed("b", [0.7, 0.4, 0.3])),  # type: ignore[arg-type]
        Member(_Fixed("img", [np.nan, 0.9, np.nan], consumes="image")),  # type: ignore[arg-type]
    ]
    decisions = Ensemble(members).assess(AssessBatch(np.zeros((3, 264, 18), np.float32)))
    assert [d.label for d in decisions] == ["NOK", "NOK", "OK"]
    assert decisions[0].p_nok == pytest.approx(0.8)  # the abstention does not count
    assert decisions[1].p_nok == pytest.approx(1.6 / 3)  # the image vote counts where there was an image
    assert decisions[0].votes[2].label == ABSTAIN and decisions[0].votes[2].p_nok is None
    assert decisions[0].n_voted == 2 and decisions[1].n_voted == 3
    weighted = Ensemble([Member(members[0].assessor, 3.0), Member(members[1].assessor, 1.0)])
    assert weighted.assess(AssessBatch(np.zeros((3, 264, 18), np.float32)))[2].p_nok == pytest.approx(0.525)


class _MeanThickness:
    """Votes the coil's mean reading; notes which thread saw how many coils."""

    name, version, consumes = "mean", 1, "matrix"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((threading.current_thread().name, len(batch)))
        p = np.nanmean(batch.matrices, axis=(1, 2)).astype(np.float32)
        if batch.images is not None:  # abstain on coils without an image: the images must follow their coils
            p = np.where([bool(imgs) for imgs in batch.images], p, np.nan).astype(np.float32)
        return p, p


def test_a_sharded_ensemble_votes_as_the_unsharded_one_in_the_same_order() -> None:
    n = 2 * MIN_SHARD_COILS + 3
    X = np.repeat(np.linspace(0.1, 0.7, n, dtype=np.float32)[:, None], 264 * 18, axis=1).reshape(n, 264, 18)
    images = [[np.zeros((4, 4), np.float32)] if i % 3 else [] for i in range(n)]
    batch = AssessBatch(X, images)
    assert [len(part) for part in AssessBatch(X[:7]).split(3)] == [2, 3, 2] and len(AssessBatch(X[:7]).split(10)) == 7
    assert [bool(imgs) for part in batch.split(3) for imgs in part.images or []] == [bool(i) for i in images]

    whole = Ensemble([Member(_MeanThickness())]).predict_arrays(batch)  # type: ignore[arg-type]
    voter = _MeanThickness()
    sharded = Ensemble([Member(voter)], shards=3).predict_arrays(batch)  # type: ignore[arg-type]
    for a, b in zip(whole, sharded, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(size for _, size in voter.calls) == [n // 2, n - n // 2]  # no shard under MIN_SHARD_COILS
    assert all(thread.startswith("ensemble-shard") for thread, _ in voter.calls)
    ensemble = Ensemble([Member(voter)], shards=2)  # type: ignore[arg-type]
    ensemble.predict_arrays(batch)
    pool = ensemble._pool
    ensemble.close()
    assert pool is not None and pool._shutdown and ensemble._pool is None
    np.testing.assert_array_equal(ensemble.predict_arrays(batch)[2], whole[2])  # a closed ensemble starts a new pool
    Ensemble([Member(voter)], shards=3).predict_arrays(AssessBatch(X[: 2 * MIN_SHARD_COILS - 1]))  # too few to split
    assert voter.calls[-1] == (threading.current_thread().name, 2 * MIN_SHARD_COILS - 1)
    with pytest.raises(ValueError, match="shards"):
        Ensemble([Member(voter)], shards=0)  # type: ignore[arg-type]


def test_shards_share_the_intra_op_threads_and_never_outnumber_them() -> None:
    before = torch.get_num_threads()
    try:
        assert share_threads(2, 4) == 2 and torch.get_num_threads() == 2
        assert share_threads(3, 1) == 1 and torch.get_num_threads() == 1  # COILGUARD_TORCH_THREADS=1: no split
        first = (share_threads(2), torch.get_num_threads())
        assert (share_threads(2), torch.get_num_threads()) == first  # a second worker in the process: the same share
    finally:
        torch.set_num_threads(before)


def test_a_sharded_ensemble_of_a_trained_network_predicts_what_it_does_unsharded() -> None:
    data = stripe_coils(60, seed=2)
    cnn = create("cnn", {"epochs": 1})
    cnn.fit(data, device="cpu")
    batch = AssessBatch(data.X)
    whole = Ensemble([Member(cnn)]).predict_arrays(batch)
    sharded = Ensemble([Member(cnn)], shards=2).predict_arrays(batch)
    for a, b in zip(whole, sharded, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # one thread against two may round differently


def test_an_assessor_from_another_package_joins_through_its_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(FIXTURES / "tiny_plugin"),
        ],
        check=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        assert "tiny" in available() and "cnn" in available()
        data = stripe_coils(100, seed=5)
        tiny = create("tiny")
        tiny.fit(data)
        tiny.save(tmp_path / "tiny")
        loaded = load_artifact(tmp_path / "tiny")
        assert type(loaded).__module__ == "coilguard_tiny"
        p, _ = loaded.predict(AssessBatch(data.X))
        assert binary_metrics(data.y, p)["f1_nok"] > 0.9
        decisions = Ensemble([Member(loaded)]).assess(AssessBatch(data.X[:4]))
        assert decisions[0].votes[0].model == "tiny"
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("coilguard_tiny")]:
            del sys.modules[name]


def test_two_registrants_of_one_name_do_not_overwrite_each_others_artifact(tmp_path: Path) -> None:
    """The weekly ReTrain and an operator's `train --register` both look up the next version of `cnn` and get 2.
    The one that records it first keeps its folder; the other takes version 3, and neither artifact is lost."""
    from services.db.engine import make_engine
    from services.db.migrate import upgrade
    from services.db.repositories import SqlModelRegistry
    from workflows.training import register

    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    registry = SqlModelRegistry(make_engine(url))
    data = stripe_coils(60, 0.2)
    first, second = (create("cnn", {"epochs": 1, "seed": seed}, name="cnn") for seed in (1, 2))
    for model in (first, second):
        model.fit(data, device="cpu")
    register(first, registry, tmp_path, status="active")  # v1
    stale = registry.next_version("cnn")  # the second registrant's look, before the first records v2

    winner = register(first, registry, tmp_path)  # v2
    looks = iter([stale])
    registry.next_version = lambda name: next(looks, None) or SqlModelRegistry.next_version(registry, name)
    loser = register(second, registry, tmp_path)

    assert (winner.version, loser.version) == (2, 3)
    batch = AssessBatch(data.X[:8])
    for record, model in ((winner, first), (loser, second)):
        np.testing.assert_array_equal(load_model(record, tmp_path).predict(batch)[0], model.predict(batch)[0])
    assert not [p for p in (tmp_path / "cnn").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_registration_that_fails_leaves_no_half_saved_folder(tmp_path: Path) -> None:
    from services.db.engine import make_engine
    from services.db.migrate import upgrade
    from services.db.repositories import SqlModelRegistry
    from workflows.training import register

    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    registry = SqlModelRegistry(make_engine(url))
    cnn = create("cnn", {"epochs": 1}, name="cnn")
    cnn.fit(stripe_coils(40), device="cpu")

    def database_away(**row: object) -> None:
        raise ConnectionError("the database went away")

    registry.add = database_away  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        register(cnn, registry, tmp_path)
    assert list((tmp_path / "cnn").iterdir()) == []


def test_a_folder_sync_is_skipped_only_where_the_file_system_cannot_do_it(tmp_path: Path, monkeypatch) -> None:
    """Some network file systems (a ReadWriteMany model store) refuse fsync on a folder: registering must not
    fail for that. An I/O error is another matter: the data did not reach the disk."""
    import errno
    import os

    from ml import durable

    def refuse(code: int):
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    durable.sync_dir(tmp_path)  # skipped
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        durable.sync_dir(tmp_path)
