"""The one contract every assessor implements, after Frigate's detector plug-ins.

An assessor has a key (``cnn``, ``yolo``, …), says what it consumes (the thickness matrix or surface
images), validates its settings with pydantic, and can ``fit``, ``predict``, ``save`` and ``load``.
The ensemble, the workers and ReTrain know nothing else about it, so a new model family is one
module and one entry point (group ``coilguard.assessors``), in this repository or in another package.

Probabilities are *calibrated* before they leave an assessor: each assessor picks on validation data
the threshold that best separates NOK from OK and shifts its output so that this threshold sits at
0.5. That makes the ensemble's average of p(NOK) over heterogeneous models meaningful, which is the
coil paper's decision rule (average the votes and confidences, threshold at 0.5).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ml.assessors.manifest import ArtifactError, Manifest, sha256_file
from ml.dataset import CoilDataset
from ml.evaluation.metrics import best_threshold, cost_threshold
from ml.matrix import as_matrix_batch
from ml.normalize import Normalizer

InputKind = Literal["matrix", "image"]
FitCallback = Callable[[dict[str, Any]], None]
"""Receives one dict per epoch for progress bars: assessor, epoch, epochs, train_loss, val_loss and val_f1 (None
where the assessor has no NOK-F1 per epoch), plus val_iou or val_accuracy where the assessor has them."""


class AssessorSettings(BaseModel):
    """Settings every trainable assessor shares; each assessor extends this with its own."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="what every random draw of a fit starts from: no negative (default_rng refuses one), under "
        "2**63 (contrastive_seg's member k takes seed + k, modulo 2**63); the "
        "generators that take 32 bits only (NumPy's legacy seed, scikit-learn's random_state) get it modulo 2**32",
    )
    epochs: int = Field(30, ge=1, le=500)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, lt=1)
    patience: int = Field(5, ge=1, description="early stopping: epochs without validation improvement")
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    class_weight_nok: float = Field(5.0, gt=0, description="loss weight of NOK relative to OK (paper: 5:1)")
    augment: bool = True
    oversample_nok: float = Field(3.0, ge=1, description="NOK coils appear this many times per epoch")
    min_threshold: float = Field(0.05, gt=0, lt=0.5, description="lowest calibration threshold allowed")
    threshold_rule: Literal["cost", "f1"] = Field(
        "cost",
        description="how the validation split sets the NOK threshold: least cost with a missed NOK coil costing "
        "class_weight_nok false alarms, or the NOK-F1 optimum (noisy on a dozen validation NOK coils)",
    )

    ignored: ClassVar[dict[str, str]] = {}
    """Shared settings this assessor has no use for, with the reason: set to anything but the default in a new
    model, they are refused (:func:`refuse_ignored`) rather than recorded in a manifest that did not use them."""

    def inherited(self) -> dict[str, Any]:
        """These settings for a model that carries them on (ReTrain's challenger), less the ones this assessor
        ignores: a manifest from before they were refused may hold one, and it changed nothing then either."""
        return {k: v for k, v in self.model_dump().items() if k not in self.ignored}

    @classmethod
    def refuse_ignored(cls, given: Mapping[str, Any]) -> None:
        """Raise ValueError for a setting in ``given`` that this assessor ignores and that is not its default.
        Only where a model is made (``create``): a manifest written before the check still loads."""
        for name, why in cls.ignored.items():
            if name in given and given[name] != cls.model_fields[name].default:
                raise ValueError(f"{name} has no effect on this assessor: {why}")


@dataclass
class AssessBatch:
    """What the ensemble hands every assessor: raw matrices (g/m², NaN = dropped) and decoded images.

    ``images[i]`` lists coil i's surface images as float32 arrays in [0, 1] (H, W); an empty list means
    the coil came without images, and image assessors abstain on it.
    """

    matrices: np.ndarray
    images: list[list[np.ndarray]] | None = None

    def __post_init__(self) -> None:
        self.matrices = as_matrix_batch(self.matrices)
        if self.images is not None and len(self.images) != len(self.matrices):
            raise ValueError("images must list one entry per coil")

    def __len__(self) -> int:
        return len(self.matrices)

    def split(self, parts: int) -> list[AssessBatch]:
        """At most ``parts`` consecutive, non-empty pieces of nearly equal size, in order."""
        bounds = np.linspace(0, len(self), min(parts, len(self)) + 1).round().astype(int)
        return [
            AssessBatch(self.matrices[lo:hi], None if self.images is None else self.images[lo:hi])
            for lo, hi in itertools.pairwise(bounds)
        ]


@dataclass
class FitReport:
    """What training produced: metrics on the assessor's own validation split, and how long it took."""

    metrics: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0
    duration_s: float = 0.0
    device: str = "cpu"


class Assessor(ABC):
    key: ClassVar[str]
    consumes: ClassVar[InputKind] = "matrix"
    Settings: ClassVar[type[AssessorSettings]] = AssessorSettings
    weight_files: ClassVar[tuple[str, ...]] = ("weights.pt",)
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 2}
    """Settings for a small, fast run (tests, the demo's initial ensemble): quality is not the point there."""

    def __init__(self, settings: AssessorSettings | Mapping[str, Any] | None = None, *, name: str | None = None):
        if isinstance(settings, AssessorSettings):
            settings = settings.model_dump()
        self.settings = self.Settings.model_validate(dict(settings or {}))
        self.name = name or self.key
        self.version: int | None = None
        self.normalizer: Normalizer | None = None
        self.threshold = 0.5  # raw-output threshold that calibration maps to 0.5
        self.training_data: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.runtime: dict[str, Any] = {}

    @property
    def can_vote(self) -> bool:
        """Whether this model ever gives a coil its NOK probability. An image classifier trained on defect types
        alone (NEU's six classes, no defect-free one) names the type but abstains on every coil."""
        return True

    # ------------------------------------------------------------------ what subclasses implement

    @abstractmethod
    def predict_raw(self, batch: AssessBatch) -> np.ndarray:
        """Uncalibrated p(NOK) per coil, shape (N,); NaN where the assessor abstains."""

    @abstractmethod
    def fit(
        self,
        dataset: CoilDataset,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        """Train on ``dataset`` (optionally warm-started from ``init``, a trained assessor of this kind)."""

    @abstractmethod
    def save_weights(self, directory: Path) -> None:
        """Write the files named in ``weight_files`` into ``directory``."""

    @abstractmethod
    def load_weights(self, directory: Path) -> None:
        """Restore from the files written by :meth:`save_weights`."""

    # ------------------------------------------------------------------ the shared behaviour

    def choose_threshold(self, y_val: np.ndarray, scores: np.ndarray) -> float:
        """The raw-score threshold that calibration maps to 0.5, chosen on the validation split by
        ``threshold_rule``."""
        s = self.settings
        bounds = {"low": s.min_threshold, "high": 1 - s.min_threshold}
        if s.threshold_rule == "f1":
            return best_threshold(y_val, scores, **bounds)
        return cost_threshold(y_val, scores, nok_cost=s.class_weight_nok, **bounds)

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated p(NOK) and confidence per coil (both NaN where the assessor abstains)."""
        raw = np.asarray(self.predict_raw(batch), dtype=np.float64)
        p_nok = calibrate(raw, self.threshold)
        confidence = np.maximum(p_nok, 1.0 - p_nok)
        return p_nok.astype(np.float32), confidence.astype(np.float32)

    def normalize(self, matrices: np.ndarray) -> np.ndarray:
        if self.normalizer is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        return self.normalizer.transform(matrices)

    def manifest(self) -> Manifest:
        return Manifest(
            kind=self.key,
            name=self.name,
            version=self.version,
            consumes=self.consumes,
            settings=self.settings.model_dump(mode="json"),
            normalization=self.normalizer.to_dict() if self.normalizer else None,
            calibration={"threshold": self.threshold},
            training_data=self.training_data,
            metrics=self.metrics,
            runtime=self.runtime,
        )

    def save(self, directory: str | Path) -> Manifest:
        """Weights first, then the manifest with their checksums and its own (``artifact_sha256``, the registry's
        ``sha256``): a crash leaves no valid-looking artifact, and a later edit to either is refused by :meth:`load`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_weights(directory)
        manifest = self.manifest()
        manifest.files = {name: sha256_file(directory / name) for name in self.weight_files}
        manifest.seal()
        manifest.write(directory)
        return manifest

    @classmethod
    def load(cls, directory: str | Path, *, allow_legacy: bool = False, expected_sha256: str | None = None) -> Assessor:
        """The assessor saved in ``directory``, refused (:class:`ArtifactError`) when any file or the manifest
        changed since :meth:`save`.

        The weights are loaded from a private copy written while they were hashed, so that a file swapped
        between the check and the load is never used. ``allow_legacy`` accepts a manifest of integrity version 1,
        whose content nothing checks: pass it only with ``expected_sha256``, the registry's checksum, which is
        compared with the very manifest the assessor is built from (a second read could be another file)."""
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if manifest.kind != cls.key:
            raise ArtifactError(f"{directory} holds a {manifest.kind!r} model, not {cls.key!r}")
        with tempfile.TemporaryDirectory(prefix="coilguard-verified-") as verified:
            manifest.verify(directory, cls.weight_files, allow_legacy=allow_legacy, copy_to=Path(verified))
            if expected_sha256 is not None and manifest.weights_sha256 != expected_sha256:
                raise ArtifactError(
                    f"{directory} is not the artifact registered: its manifest (integrity version "
                    f"{manifest.integrity}) hashes to {manifest.weights_sha256[:12]}…, the registry recorded "
                    f"{expected_sha256[:12]}…"
                )
            assessor = cls._from_manifest(manifest)
            assessor.load_weights(Path(verified))
        return assessor

    @classmethod
    def _from_manifest(cls, manifest: Manifest) -> Assessor:
        """An assessor with everything but its weights taken from ``manifest``."""
        assessor = cls(manifest.settings, name=manifest.name)
        assessor.version = manifest.version
        assessor.normalizer = Normalizer.from_dict(manifest.normalization) if manifest.normalization else None
        assessor.threshold = float(manifest.calibration.get("threshold", 0.5))
        assessor.training_data = manifest.training_data
        assessor.metrics = manifest.metrics
        # what trained the network, kept should it be saved again (ReTrain's read-through candidate, a re-sealed
        # legacy model): that save's manifest names its own time and code, not those of the training
        trained = {"created_at": manifest.created_at.isoformat(), "code_version": manifest.code_version}
        assessor.runtime = {**manifest.runtime, "trained": manifest.runtime.get("trained", trained)}
        return assessor

    def describe(self) -> str:
        return f"{self.name} v{self.version}" if self.version is not None else self.name

    def warm_start_source(self, init: Assessor) -> Self:
        """``init`` as a trained assessor of this kind (ReTrain warm-starts a challenger from its champion),
        or a TypeError that names it."""
        if not isinstance(init, type(self)) or getattr(init, "net", None) is None:
            raise TypeError(f"cannot warm-start a {self.key} assessor from {init.describe()}")
        return init


def calibrate(raw: np.ndarray, threshold: float) -> np.ndarray:
    """Shift in logit space so that ``threshold`` maps to 0.5; monotone, so rankings (ROC-AUC) are kept."""
    eps = 1e-6
    p = np.clip(raw, eps, 1 - eps)
    t = float(np.clip(threshold, eps, 1 - eps))
    logit = np.log(p / (1 - p)) - np.log(t / (1 - t))
    out = 1.0 / (1.0 + np.exp(-logit))
    return np.where(np.isnan(raw), np.nan, out)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
