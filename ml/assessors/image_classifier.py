"""What the multi-class image assessors (``rmcsam``, ``selfcon_margin``) share: fitting on an ImageSet (or on
coils rendered as images), seeds, the hold-out split, the epoch loop, the coil vote and saving.

A family supplies the network (with ``freeze(stages)`` over its EfficientNet-Lite0 backbone), the loss
of one training batch and the class probabilities of a batch; everything else lives here.

From defect types to the coil vote
    p(NOK) of an image = 1 − Σ p(defect-free classes) (``ml.imagesets.base.OK_CLASSES``); a two-class
    OK/NOK set from coils thus gives p(NOK) directly, and a coil with several images takes the most
    defective one (max). A model trained only on defect classes (NEU: all six are defects) has never
    seen a defect-free surface and cannot tell OK from NOK, so it abstains (NaN) on every coil rather
    than call everything NOK; it still names the defect type through :meth:`predict_classes`.

Few-shot training
    ``holdout`` (default) keeps ``val_fraction`` of each class's images for early stopping, the
    calibration threshold and the validation metrics. A few-shot run (10 images per class) cannot spare
    any: ``holdout=False`` trains on all of them for the fixed number of epochs, as the papers do, and
    leaves the threshold at 0.5.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ml.assessors.base import AssessBatch, Assessor, AssessorSettings, FitCallback, FitReport, Stopwatch, calibrate
from ml.assessors.effnet.torch_model import N_STAGES
from ml.evaluation.metrics import binary_metrics, f1_nok
from ml.imagesets.base import OK_CLASSES, ImageSet
from ml.imagesets.folder import content_digest
from ml.training.image_augment import AugmentConfig, to_tensor
from ml.training.loop import EarlyStopping
from ml.training.runtime import channels_last_net, fit_runtime, resolve_device, seed_everything

WEIGHTS = "weights.pt"
PREDICT_CHUNK = 64


class ImageClassifierSettings(AssessorSettings):
    ignored: ClassVar[dict[str, str]] = {"oversample_nok": "every image is seen once an epoch"}

    lr: float = Field(5e-4, gt=0, lt=1, description="Adam (both papers: 5e-4)")
    batch_size: int = Field(32, ge=2, le=4096)
    imgsz: int = Field(96, ge=32, le=512, description="side of the square the images are resized to")
    freeze: int = Field(3, ge=0, le=N_STAGES, description="stem and first k of 7 backbone stages keep ImageNet weights")
    pretrained: bool = Field(True, description="start from the ImageNet weights (False: from scratch)")
    holdout: bool = Field(True, description="keep val_fraction of each class for validation (False: few-shot)")
    min_crop: float = Field(0.6, gt=0, le=1, description="augmentation: smallest random crop, fraction of the side")
    max_degrees: float = Field(0.0, ge=0, le=45, description="augmentation: free rotation besides the 90° turns")
    brightness: float = Field(0.2, ge=0, lt=1, description="augmentation: intensity jitter")
    contrast: float = Field(0.2, ge=0, lt=1, description="augmentation: contrast jitter")


class ImageClassifierAssessor(Assessor):
    consumes = "image"
    Settings = ImageClassifierSettings
    weight_files: tuple[str, ...] = (WEIGHTS,)

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        self.net: nn.Module | None = None
        self.classes: list[str] = []

    # ------------------------------------------------------------------ what a family implements

    @abstractmethod
    def build_network(self, n_classes: int, pretrained: bool) -> nn.Module:
        """A fresh network with ``freeze(stages) -> trainable parameters``; ImageNet weights when ``pretrained``."""

    @abstractmethod
    def batch_loss(
        self, net: nn.Module, gray: torch.Tensor, labels: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        """The loss of one batch of (B, 1, S, S) gray images in [0, 1]; augmenting them is up to the family."""

    @abstractmethod
    def class_probabilities(self, net: nn.Module, gray: torch.Tensor) -> torch.Tensor:
        """(B, n_classes) probabilities of an un-augmented gray batch; called under ``no_grad`` in eval mode."""

    def after_fit(self, net: nn.Module, gray: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Anything to derive from the trained network and its training images (references); runtime notes."""
        return {}

    # ------------------------------------------------------------------ training

    @property
    def augment_config(self) -> AugmentConfig:
        s: ImageClassifierSettings = self.settings  # type: ignore[assignment]
        if not s.augment:
            return AugmentConfig(min_crop=1.0, rot90=False, flips=False, brightness=0.0, contrast=0.0)
        return AugmentConfig(s.min_crop, True, True, s.max_degrees, s.brightness, s.contrast)

    def fit(
        self,
        dataset: Any,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        """Train on an :class:`ImageSet`, or a CoilDataset rendered by :meth:`ImageSet.from_coils` (OK/NOK)."""
        clock = Stopwatch()
        s: ImageClassifierSettings = self.settings  # type: ignore[assignment]
        np_rng = seed_everything(s.seed)
        rng = torch.Generator().manual_seed(s.seed)
        torch_device = resolve_device(device)
        imageset = dataset if isinstance(dataset, ImageSet) else ImageSet.from_coils(dataset, size=s.imgsz)
        if len(imageset) < 2:
            raise ValueError(f"the {self.key} assessor needs at least two images, got {len(imageset)}")
        if init is not None:
            init = self.warm_start_source(init)
            if init.classes != imageset.classes:
                raise ValueError(f"warm start needs the same classes: {init.classes} vs {imageset.classes}")
            net = self.build_network(len(imageset.classes), pretrained=False)
            net.load_state_dict(init.net.state_dict())
        else:
            net = self.build_network(len(imageset.classes), pretrained=s.pretrained)
        self.classes = list(imageset.classes)
        start = "init" if init is not None else ("imagenet" if s.pretrained else "scratch")
        parameters = net.freeze(0 if start == "scratch" else s.freeze)  # type: ignore[operator]
        channels_last_net(net).to(torch_device)

        gray = to_tensor(imageset.images, s.imgsz)
        labels = torch.as_tensor(imageset.labels, dtype=torch.long)
        if s.holdout:
            train_idx, val_idx = holdout_split(imageset.labels, s.val_fraction, np_rng)
        else:
            train_idx, val_idx = np.arange(len(imageset)), np.zeros(0, dtype=np.int64)
        val_nok = imageset.nok[val_idx].astype(bool)
        optimizer = torch.optim.Adam(parameters, lr=s.lr)
        history: list[dict[str, Any]] = []
        stopping = EarlyStopping(net, s.patience, min_delta=1e-4)  # only with a holdout to judge by
        for epoch in range(1, s.epochs + 1):
            started = time.perf_counter()
            stop = False
            net.train()
            losses = []
            order = train_idx[torch.randperm(len(train_idx), generator=rng).numpy()]
            for batch in even_batches(order, s.batch_size):
                loss = self.batch_loss(net, gray[batch].to(torch_device), labels[batch].to(torch_device), rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5)}
            if len(val_idx):
                probs = self._probabilities(net, gray[val_idx], torch_device)
                val_loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-8)), labels[val_idx]))
                entry.update(val_loss=round(val_loss, 5), val_accuracy=_accuracy(probs, labels[val_idx]))
                if self.ok_classes:
                    entry["val_f1"] = round(f1_nok(val_nok, self._p_nok(probs) >= 0.5), 5)
                stop = stopping.should_stop(epoch, val_loss)
            entry["seconds"] = round(time.perf_counter() - started, 2)
            history.append(entry)
            if callback is not None:
                callback(
                    {
                        "assessor": self.name,
                        "epoch": epoch,
                        "epochs": s.epochs,
                        "train_loss": entry["train_loss"],
                        "val_loss": entry.get("val_loss"),
                        "val_f1": entry.get("val_f1"),  # NOK-F1 as for the other assessors; None without OK classes
                        "val_accuracy": entry.get("val_accuracy"),  # the defect type's
                    }
                )
            if stop:
                break
        if len(val_idx):
            stopping.restore_best()
        net.cpu().eval()
        self.net = net
        cpu = torch.device("cpu")
        notes = self.after_fit(net, gray[train_idx], labels[train_idx])

        self.metrics = {
            "train": {"accuracy": _accuracy(self._probabilities(net, gray[train_idx], cpu), labels[train_idx])}
        }
        self.threshold = 0.5
        if len(val_idx):
            probs = self._probabilities(net, gray[val_idx], cpu)
            # the OK/NOK figures under the keys the other assessors use (f1_nok, …), the defect type's beside them
            validation: dict[str, Any] = {"n": len(val_idx), "class_accuracy": _accuracy(probs, labels[val_idx])}
            if self.ok_classes and 0 < imageset.nok[val_idx].sum() < len(val_idx):
                y_nok, p_nok = imageset.nok[val_idx], self._p_nok(probs)
                self.threshold = self.choose_threshold(y_nok, p_nok)
                validation.update(binary_metrics(y_nok, calibrate(p_nok, self.threshold)))
            self.metrics["validation"] = validation
        self.training_data = {
            "n_images": len(imageset),
            "classes": self.classes,
            "per_class": {c: int((imageset.labels == i).sum()) for i, c in enumerate(self.classes)},
            "n_train": len(train_idx),
            "n_validation": len(val_idx),
            "image_shapes": sorted({f"{a.shape[0]}x{a.shape[1]}" for a in imageset.images}),
            "source": _jsonable(imageset.meta),
            "content_sha256": content_digest(imageset),  # these very images: a few-shot draw of a folder included
        }
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=len(history),
            best_epoch=stopping.best_epoch if len(val_idx) else len(history),
            history=history,
            start=start,
            frozen_stages=0 if start == "scratch" else s.freeze,
            **notes,
        )
        return FitReport(self.metrics, len(history), clock.seconds, str(torch_device))

    # ------------------------------------------------------------------ prediction

    @property
    def can_vote(self) -> bool:
        return bool(self.ok_classes)

    @property
    def ok_classes(self) -> list[int]:
        """Indices of the defect-free classes; empty for a set of defect types only (then the vote abstains)."""
        return [i for i, c in enumerate(self.classes) if c.lower() in OK_CLASSES]

    def predict_classes(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The most probable class index of each image, and the (N, n_classes) probabilities."""
        net = self._require_net()
        s: ImageClassifierSettings = self.settings  # type: ignore[assignment]
        probs = self._probabilities(net, to_tensor(images, s.imgsz), torch.device("cpu")).numpy()
        return probs.argmax(axis=1), probs

    def predict_raw(self, batch: AssessBatch) -> np.ndarray:
        """p(NOK) per coil: its most defective image; NaN for a coil without images or a defect-types-only model."""
        self._require_net()
        out = np.full(len(batch), np.nan)
        if batch.images is None or not self.ok_classes:
            return out
        owner = [i for i, coil in enumerate(batch.images) for _ in coil]
        if not owner:
            return out
        _, probs = self.predict_classes([image for coil in batch.images for image in coil])
        p_nok = self._p_nok(torch.from_numpy(probs))
        for coil in np.unique(owner):
            out[coil] = float(p_nok[np.asarray(owner) == coil].max())
        return out

    def _p_nok(self, probs: torch.Tensor) -> np.ndarray:
        return (1.0 - probs[:, self.ok_classes].sum(dim=1)).clamp(0.0, 1.0).double().numpy()

    def _probabilities(self, net: nn.Module, gray: torch.Tensor, device: torch.device) -> torch.Tensor:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            parts = [
                self.class_probabilities(net, gray[i : i + PREDICT_CHUNK].to(device)).cpu()
                for i in range(0, len(gray), PREDICT_CHUNK)
            ]
        net.train(was_training)
        return torch.cat(parts) if parts else torch.zeros((0, len(self.classes)))

    def _require_net(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        return self.net

    # ------------------------------------------------------------------ persistence

    def save_weights(self, directory: Path) -> None:
        torch.save(self._require_net().state_dict(), directory / WEIGHTS)

    def load_weights(self, directory: Path) -> None:
        self.classes = list(self.training_data.get("classes", []))
        if not self.classes:
            raise RuntimeError(f"the manifest of {self.describe()} lists no classes")
        net = self.build_network(len(self.classes), pretrained=False)
        net.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
        self.net = channels_last_net(net).eval()


def holdout_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``fraction`` of the images (at least one) for validation; a class of one image only trains."""
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        val.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val)).astype(np.int64)


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((probs.argmax(dim=1) == labels).float().mean()), 5) if len(labels) else float("nan")


def _jsonable(value: Any) -> Any:
    """The image set's meta as JSON can hold it (numbers, strings, nested dicts and lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def even_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` in batches of about equal size, at most ``batch_size`` each where that leaves no batch of one
    (batch norm cannot train on one): ``np.array_split`` of 5 into 3 gave 2, 2, 1, and at a small ``imgsz``
    rmcsam's attention failed on that last batch; 5 at most 2 a batch is then 3, 2."""
    n_batches = max(1, -(-len(order) // batch_size))
    if n_batches > 1 and len(order) // n_batches < 2:
        n_batches -= 1
    return np.array_split(order, n_batches)
