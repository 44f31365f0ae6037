"""The steps that open and close fitting a network on coil matrices, shared by the one-logit classifiers
(``cnn``, ``yolo``, ``effnet``) and the Siamese network: their training loops differ, but how they warm-start,
normalize, split and calibrate should not, so it is written once here."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from torch import nn

from ml.assessors.base import Assessor, AssessorSettings, calibrate
from ml.dataset import CoilDataset
from ml.evaluation.metrics import binary_metrics
from ml.normalize import Normalizer
from ml.training.augment import augment_batch
from ml.training.loop import Augment
from ml.training.splits import stratified_split


class MatrixSettings(AssessorSettings):
    """Settings of the assessors that learn from the sensor matrix itself."""

    gain_jitter: float = Field(
        0.03,
        ge=0,
        le=0.2,
        description="sd of a per-sensor gain error drawn for every training coil when augmenting (gauges drifting "
        "off calibration; cut at 2.5 sd); 0: none, as in the paper",
    )


@dataclass(frozen=True)
class MatrixFitData:
    """The network to train and the normalized coils, split by index into training and validation."""

    net: nn.Module
    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    augment: Augment | None


def start_matrix_fit(
    assessor: Any, dataset: CoilDataset, init: Assessor | None, val_fraction: float, rng: np.random.Generator
) -> MatrixFitData:
    """A fresh network and normalizer, or, warm-starting from ``init``, a copy of its network with its
    normalizer: the champion's scale, so that its learned features still mean the same. ``assessor`` is
    any assessor with ``build_network()``."""
    if init is not None:
        source = assessor.warm_start_source(init)
        assessor.normalizer = source.normalizer
        net = assessor.build_network()
        net.load_state_dict(source.net.state_dict())
    else:
        assessor.normalizer = Normalizer.fit(dataset.X)
        net = assessor.build_network()
    y = dataset.y.astype(np.int64)
    train, val = stratified_split(y, val_fraction, rng, groups=dataset.coil_id)
    return MatrixFitData(net, assessor.normalize(dataset.X), y, train, val, _augmenter(assessor))


def _augmenter(assessor: Any) -> Augment | None:
    """The paper's augmentation plus the gain error, scaled about the normalized 0 g/m² of the assessor's limits."""
    settings: MatrixSettings = assessor.settings
    if not settings.augment:
        return None
    limits: Normalizer = assessor.normalizer
    zero = -limits.low / (limits.high - limits.low)
    return functools.partial(augment_batch, gain_sigma=settings.gain_jitter, zero=zero)


def calibrate_on_validation(assessor: Assessor, dataset: CoilDataset, y_val: np.ndarray, scores: np.ndarray) -> None:
    """Set the assessor's threshold from its validation scores, and the validation metrics and data summary
    its manifest records."""
    assessor.threshold = assessor.choose_threshold(y_val, scores)
    assessor.metrics = {"validation": binary_metrics(y_val, calibrate(scores, assessor.threshold))}
    assessor.training_data = dataset.summary()
