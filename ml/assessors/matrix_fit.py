"""The steps that open and close fitting a network on coil matrices, shared by the one-logit classifiers
(``cnn``, ``yolo``, ``effnet``) and the Siamese network: their training loops differ, but how they warm-start,
normalize, split and calibrate should not, so it is written once here."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from torch import nn

from ml.assessors.base import Assessor, AssessorSettings, calibrate
from ml.dataset import INIT_VALIDATION_CURRENT, LEARNED_BY_INIT, CoilDataset
from ml.evaluation.metrics import binary_metrics
from ml.normalize import Normalizer
from ml.training.augment import augment_batch
from ml.training.loop import Augment
from ml.training.splits import split_keeping, stratified_split

log = logging.getLogger(__name__)


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
    split: dict[str, Any]  # how the validation coils were chosen, for the manifest


def start_matrix_fit(
    assessor: Any, dataset: CoilDataset, init: Assessor | None, val_fraction: float, rng: np.random.Generator
) -> MatrixFitData:
    """A fresh network and normalizer, or, warm-starting from ``init``, a copy of its network with its
    normalizer: the champion's scale, so that its learned features still mean the same. Not the champion's
    ``gauge_gains``: the data a challenger is trained on is in the gauges' current calibration (ReTrain
    recalibrates the history), so it must read live coils as they come. ``assessor`` is any assessor with
    ``build_network()``."""
    if init is not None:
        source = assessor.warm_start_source(init)
        assessor.normalizer = source.normalizer.without_gauge_gains()
        net = assessor.build_network()
        net.load_state_dict(source.net.state_dict())
    else:
        assessor.normalizer = Normalizer.fit(dataset.X)
        net = assessor.build_network()
    y = dataset.y.astype(np.int64)
    train, val, split = _validation_split(dataset, y, init, val_fraction, rng)
    return MatrixFitData(net, assessor.normalize(dataset.X), y, train, val, _augmenter(assessor), split)


def _validation_split(
    dataset: CoilDataset, y: np.ndarray, init: Assessor | None, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Training and validation rows.

    Warm-starting (ReTrain's challenger), a coil marked in the dataset's ``learned_by_init`` column never
    validates: it would reward what the weights remember. Validation is a share of the coils the starting model
    never saw, the newly labelled ones, the regime the model is retrained for; the starting model's own
    validation coils (its manifest lists them) join them where they were put in that regime (the dataset's
    ``init_validation_current``: ReTrain recalibrated them after a gauge drift), or where the new coils hold no
    NOK. Why (docs/benchmarks.md, drift recovery): validated on old coils in the old calibration, the challenger
    stopped before it had learned a sensor drift; validated on the new coils alone, its threshold followed one
    or two NOK coils, which after a gauge drift cost more than the recalibrated old coils did, and after a new
    defect type less. Without the marks, or with no NOK coil it did not learn, the split is drawn from all
    coils. The manifest says which rule chose the coils.
    """
    if init is None:
        train, val = stratified_split(y, val_fraction, rng, groups=dataset.coil_id)
        return train, val, {"rule": "drawn"}
    if LEARNED_BY_INIT not in dataset.columns:
        log.warning("warm start from %s, no %r column: validation drawn from all coils", init.name, LEARNED_BY_INIT)
        train, val = stratified_split(y, val_fraction, rng, groups=dataset.coil_id)
        return train, val, {"rule": f"drawn, although warm-started: no {LEARNED_BY_INIT} column"}
    learned = dataset.column(LEARNED_BY_INIT).astype(bool)
    validated = np.isin(dataset.coil_id, np.asarray(init.training_data.get("validation_coils", []), dtype=str))
    validated &= ~learned
    with_kept = "the starting model's validation coils and a share of the coils new to it"
    if dataset.meta.get(INIT_VALIDATION_CURRENT) and validated.any():
        attempts = [(f"{with_kept} (its validation coils recalibrated)", learned, validated)]
    else:
        new_only = ("a share of the coils new to the starting model", learned | validated, np.zeros(len(y), bool))
        attempts = [new_only, (f"{with_kept} (no new NOK)", learned, validated)]
    for rule, in_train, in_val in attempts:
        train, val = split_keeping(y, val_fraction, rng, dataset.coil_id, in_train=in_train, in_val=in_val)
        if len(np.unique(y[val])) == 2 or len(np.unique(y)) < 2:
            n_kept = len(np.unique(dataset.coil_id[in_val]))
            n_new = len(np.unique(dataset.coil_id[val])) - n_kept
            return train, val, {"rule": f"warm start: {rule}", "kept": n_kept, "coils_new": n_new}
    missing = "NOK" if 1 not in y[val] else "OK"
    log.warning("warm start from %s: no %s coil it did not learn; validation drawn from all coils", init.name, missing)
    train, val = stratified_split(y, val_fraction, rng, groups=dataset.coil_id)
    return train, val, {"rule": f"drawn, although warm-started: no {missing} coil the starting model did not learn"}


def _augmenter(assessor: Any) -> Augment | None:
    """The paper's augmentation plus the gain error, scaled about the normalized 0 g/m² of the assessor's limits."""
    settings: MatrixSettings = assessor.settings
    if not settings.augment:
        return None
    limits: Normalizer = assessor.normalizer
    zero = -limits.low / (limits.high - limits.low)
    return functools.partial(augment_batch, gain_sigma=settings.gain_jitter, zero=zero)


def calibrate_on_validation(assessor: Assessor, dataset: CoilDataset, data: MatrixFitData, scores: np.ndarray) -> None:
    """Set the assessor's threshold from its validation scores, and the validation metrics and data summary
    its manifest records; the validation coils are listed so that a model warm-started from this one can
    keep them out of its training (see :func:`_validation_split`)."""
    y_val = data.y[data.val]
    assessor.threshold = assessor.choose_threshold(y_val, scores)
    assessor.metrics = {"validation": binary_metrics(y_val, calibrate(scores, assessor.threshold))}
    assessor.training_data = {
        **dataset.summary(),
        "validation": {**data.split, "coils": len(data.val)},
        "validation_coils": sorted(np.unique(dataset.coil_id[data.val]).tolist()),
    }
