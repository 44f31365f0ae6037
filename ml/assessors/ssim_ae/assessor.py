"""``ssim_ae``: the fail-safe for defects nobody has labelled — an SSIM autoencoder (Bergmann et al. 2019)
trained on defect-free surface images only, flagging what it cannot reconstruct.

Training: the OK images of whatever set it is given (an :class:`~ml.imagesets.ImageSet`, or coils
rendered as images) are resized to ``image_size``; ``val_fraction`` of them is held out; the network
learns 128 × 128 patches (random crops with flips) with the DSSIM loss, Adam, early stopping on the
held-out DSSIM. Defect images are never trained on: they only calibrate.

Scoring: the residual map is 1 − SSIM(image, reconstruction) with a ``window`` of 7, 11 or 15 (the
anomaly paper's grid). The pixel threshold is the one maximizing Youden's J (TPR − FPR) over the
validation pixels when the validation data have defect masks; otherwise the ``ok_quantile`` of the OK
validation residuals. An image's raw p(NOK) is the largest residual (``score="max"``) or the share of
pixels above the pixel threshold mapped to [0, 1) as a / (a + ``area_scale``) (``score="area"``); a coil
takes its worst image, and abstains (NaN) without images. The image-level threshold is again Youden's J
on the validation images when both classes are there, else the ``ok_quantile`` of the OK scores; the
shared calibration then puts it at 0.5.

Whether it learned anything: the validation DSSIM is compared with that of the mean training image
(``mean_image_dssim``). An autoencoder trained too briefly outputs that mean whatever it is shown, and its
residual map is then just the image's own texture; a ``reconstruction_gain`` near 0 says so (and is
logged as a warning) before anyone trusts its scores.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ml.assessors.base import Assessor, AssessorSettings, FitCallback, FitReport, Stopwatch, calibrate
from ml.assessors.pixel_map import PixelMapAssessor
from ml.assessors.ssim_ae.loss import dssim_loss, residual_map
from ml.assessors.ssim_ae.torch_model import PATCH, SsimAutoencoder
from ml.evaluation.metrics import binary_metrics, youden_threshold
from ml.imagesets.base import ImageSet
from ml.imagesets.folder import as_image_set, image_set_summary, resize_image, resize_mask
from ml.training.loop import EarlyStopping
from ml.training.runtime import fit_runtime, resolve_device, seed_everything

log = logging.getLogger(__name__)

MAX_CALIBRATION_PIXELS = 2_000_000  # Youden's J on a seeded sample beyond this: same threshold, less memory
MIN_RECONSTRUCTION_GAIN = 0.1  # below this share of the mean image's DSSIM removed, the network is not reconstructing


class SsimAeSettings(AssessorSettings):
    ignored: ClassVar[dict[str, str]] = {
        "class_weight_nok": "it learns from defect-free images only, with no class in its loss",
        "oversample_nok": "it learns from defect-free images only",
        "threshold_rule": "its thresholds are Youden's J on the validation split, or a quantile of defect-free scores",
        "min_threshold": "its thresholds are Youden's J on the validation split, or a quantile of defect-free scores",
    }

    epochs: int = Field(40, ge=1, le=500)
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, lt=1, description="Adam (Bergmann et al.: 2e-4 for 200 epochs; slower here)")
    weight_decay: float = Field(1e-5, ge=0, lt=1)
    latent_dim: int = Field(100, ge=2, le=2048, description="bottleneck size; the paper compares 100, 300, 500")
    width: int = Field(32, ge=4, le=128, description="channels of the first convolution (Bergmann: 32)")
    window: Literal[7, 11, 15] = Field(11, description="SSIM window of the residual map")
    train_window: int = Field(11, ge=3, le=31, description="SSIM window of the training loss (odd)")
    image_size: int = Field(128, ge=PATCH, le=1024, description="images are resized to this square side first")
    stride: int = Field(64, ge=8, le=PATCH, description="patch step when image_size > 128 (overlaps averaged)")
    patches_per_image: int = Field(1, ge=1, le=64, description="random patches drawn per training image and epoch")
    score: Literal["max", "area"] = Field("max", description="image score: largest residual, or area above threshold")
    area_scale: float = Field(0.01, gt=0, lt=1, description="area share that maps to raw p(NOK) = 0.5 (score=area)")
    ok_quantile: float = Field(0.99, gt=0.5, lt=1, description="thresholds when the validation has no defects")
    blur: float = Field(0.0, ge=0, le=16, description="Gaussian σ (pixels at image_size) applied before the network")


class SsimAeAssessor(PixelMapAssessor):
    key = "ssim_ae"
    Settings = SsimAeSettings
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 3, "width": 8, "batch_size": 8}

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        if self.settings.train_window % 2 == 0:
            raise ValueError("train_window must be odd")
        self.net: SsimAutoencoder | None = None
        self.pixel_threshold = 0.5

    @property
    def s(self) -> SsimAeSettings:
        return self.settings  # type: ignore[return-value]

    def build_network(self) -> SsimAutoencoder:
        return SsimAutoencoder(self.s.latent_dim, self.s.width)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        dataset: ImageSet | Any,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        clock = Stopwatch()
        s = self.s
        rng = seed_everything(s.seed)
        torch_device = resolve_device(device)
        images = as_image_set(dataset)
        nok = images.nok.astype(bool)
        ok_idx = np.flatnonzero(~nok)
        if len(ok_idx) < 2:
            raise ValueError(f"the {self.key} assessor trains on defect-free images and got {len(ok_idx)}")
        ok_idx = rng.permutation(ok_idx)
        n_val = max(1, round(len(ok_idx) * s.val_fraction))
        train_idx, val_ok_idx = ok_idx[n_val:], ok_idx[:n_val]
        val_idx = np.r_[val_ok_idx, np.flatnonzero(nok)]

        net = self.build_network()
        if init is not None:
            init = self.warm_start_source(init)
            net.load_state_dict(init.net.state_dict())
        train = np.stack([self.prepare(images.images[i]) for i in train_idx])
        val_patches = _tile_patches(np.stack([self.prepare(images.images[i]) for i in val_ok_idx]))
        history, best_epoch, best_dssim = self._train(net, train, val_patches, rng, torch_device, callback)
        self.net = net.cpu().eval()

        self._calibrate(images, val_idx)
        self.metrics["validation"].update(self._reconstruction_check(best_dssim, train, len(val_ok_idx), val_patches))
        self.training_data = {
            **image_set_summary(images),
            "n_train_ok": len(train_idx),
            "n_val_ok": len(val_ok_idx),
            "n_val_nok": int(nok.sum()),
            "trained_on": "defect-free images only",
        }
        if images.meta.get("source") == "coils":
            self.training_data["coils"] = images.meta.get("coils")
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=len(history),
            best_epoch=best_epoch,
            history=history,
            start="init" if init is not None else "scratch",
        )
        return FitReport(self.metrics, len(history), clock.seconds, str(torch_device))

    def _train(
        self,
        net: SsimAutoencoder,
        train: np.ndarray,
        val_patches: np.ndarray,
        rng: np.random.Generator,
        device: torch.device,
        callback: FitCallback | None,
    ) -> tuple[list[dict[str, float]], int, float]:
        s = self.s
        net.to(device)
        opt = torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        val = torch.from_numpy(val_patches[:, None])
        stopping, history = EarlyStopping(net, s.patience), []
        for epoch in range(1, s.epochs + 1):
            net.train()
            order = np.repeat(rng.permutation(len(train)), s.patches_per_image)
            losses = []
            for start in range(0, len(order), s.batch_size):
                x = torch.from_numpy(_random_patches(train[order[start : start + s.batch_size]], rng, s.augment))
                x = x[:, None].to(device)
                loss = dssim_loss(x, net(x), s.train_window)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            net.eval()
            with torch.no_grad():
                total = sum(float(dssim_loss(b, net(b), s.train_window)) * len(b) for b in val.to(device).split(64))
            val_loss = total / max(len(val), 1)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss}
            history.append(row)
            if callback is not None:
                callback({"assessor": self.name, "epochs": s.epochs, "val_f1": None, **row})
            if stopping.should_stop(epoch, val_loss):
                break
        stopping.restore_best()
        return history, stopping.best_epoch, stopping.best_loss

    def _calibrate(self, images: ImageSet, val_idx: np.ndarray) -> None:
        """Pixel threshold, image threshold and validation metrics from the held-out images."""
        s = self.s
        maps = self.residual_maps([images.images[i] for i in val_idx], original_size=False)
        y_img = images.nok[val_idx].astype(int)
        metrics: dict[str, Any] = {"window": s.window, "n_val": len(val_idx), "n_val_nok": int(y_img.sum())}
        masked = images.masks is not None and y_img.any()
        if masked:
            masks = [resize_mask(images.masks[i], s.image_size) for i in val_idx]  # type: ignore[index]
            pixels = np.concatenate([m.ravel() for m in maps])
            truth = np.concatenate([m.ravel() for m in masks])
            if len(pixels) > MAX_CALIBRATION_PIXELS:
                pick = np.random.default_rng(s.seed).choice(len(pixels), MAX_CALIBRATION_PIXELS, replace=False)
                pixels, truth = pixels[pick], truth[pick]
            self.pixel_threshold = youden_threshold(truth, pixels)
            metrics["pixel_roc_auc"] = float(roc_auc_score(truth, pixels)) if 0 < truth.sum() < len(truth) else None
            metrics["pixel_threshold_rule"] = "youden"
        else:
            ok_pixels = np.concatenate([m.ravel() for m, y in zip(maps, y_img, strict=True) if y == 0])
            self.pixel_threshold = float(np.quantile(ok_pixels, s.ok_quantile))
            metrics["pixel_threshold_rule"] = f"ok_quantile {s.ok_quantile}"
        scores = np.array([self._image_score(m) for m in maps])
        if 0 < y_img.sum() < len(y_img):
            self.threshold = youden_threshold(y_img, scores)
            metrics["image_threshold_rule"] = "youden"
        else:
            self.threshold = float(np.quantile(scores[y_img == 0], s.ok_quantile))
            metrics["image_threshold_rule"] = f"ok_quantile {s.ok_quantile}"
        self.threshold = float(np.clip(self.threshold, 1e-4, 1 - 1e-4))
        metrics["pixel_threshold"] = self.pixel_threshold
        metrics.update(binary_metrics(y_img, calibrate(scores, self.threshold)))
        self.metrics = {"validation": metrics}

    def _reconstruction_check(
        self, dssim: float, train: np.ndarray, n_val: int, val_patches: np.ndarray
    ) -> dict[str, float]:
        """The kept weights' validation DSSIM against the mean training image's, patch by patch."""
        mean_patches = np.tile(_tile_patches(train.mean(0, keepdims=True)), (n_val, 1, 1))
        with torch.no_grad():
            baseline = float(
                dssim_loss(
                    torch.from_numpy(val_patches[:, None]), torch.from_numpy(mean_patches[:, None]), self.s.train_window
                )
            )
        gain = 1.0 - dssim / baseline if baseline > 0 else 0.0
        if gain < MIN_RECONSTRUCTION_GAIN:
            log.warning(
                "%s: validation DSSIM %.3f is hardly below the mean training image's %.3f: the autoencoder outputs "
                "about the same image whatever it sees, so its residuals are the images' own texture; train longer",
                self.name,
                dssim,
                baseline,
            )
        return {"dssim": dssim, "mean_image_dssim": baseline, "reconstruction_gain": gain}

    # ------------------------------------------------------------------ scoring

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """What the network sees: the image resized to ``image_size``, smoothed when ``blur`` (grain is no defect)."""
        x = resize_image(image, self.s.image_size)
        return ndimage.gaussian_filter(x, self.s.blur).astype(np.float32) if self.s.blur > 0 else x

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        """The reconstruction of :meth:`prepare`'s image (patch-wise, overlaps averaged)."""
        if self.net is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        x = self.prepare(image)
        positions = _positions(x.shape[0], self.s.stride), _positions(x.shape[1], self.s.stride)
        patches = np.stack([x[r : r + PATCH, c : c + PATCH] for r in positions[0] for c in positions[1]])
        with torch.no_grad():
            out = self.net(torch.from_numpy(patches[:, None])).numpy()[:, 0]
        total = np.zeros_like(x)
        count = np.zeros_like(x)
        k = 0
        for r in positions[0]:
            for c in positions[1]:
                total[r : r + PATCH, c : c + PATCH] += out[k]
                count[r : r + PATCH, c : c + PATCH] += 1
                k += 1
        return total / count

    def residual_maps(
        self, images: list[np.ndarray], window: int | None = None, original_size: bool = True
    ) -> list[np.ndarray]:
        """1 − SSIM per image, in [0, 1]; at each image's own size, or at ``image_size`` when not ``original_size``."""
        window = window or self.s.window
        maps = []
        for image in images:
            x = self.prepare(image)
            recon = self.reconstruct(image)
            r = residual_map(torch.from_numpy(x)[None, None], torch.from_numpy(recon)[None, None], window)
            r = r[0, 0].numpy()
            maps.append(resize_image(r, image.shape) if original_size else r)
        return maps

    def _image_score(self, residual: np.ndarray) -> float:
        if self.s.score == "max":
            return float(residual.max())
        area = float(np.mean(residual > self.pixel_threshold))
        return area / (area + self.s.area_scale)

    def image_scores(self, images: list[np.ndarray], window: int | None = None) -> np.ndarray:
        """Raw p(NOK) of each image."""
        return np.array([self._image_score(m) for m in self.residual_maps(images, window, original_size=False)])


def _positions(length: int, stride: int) -> list[int]:
    if length <= PATCH:
        return [0]
    positions = list(range(0, length - PATCH + 1, stride))
    if positions[-1] != length - PATCH:
        positions.append(length - PATCH)
    return positions


def _tile_patches(images: np.ndarray) -> np.ndarray:
    """(N, S, S) → every 128 × 128 tile at stride 128 (plus the last one flush with the edge)."""
    size = images.shape[1]
    pos = _positions(size, PATCH)
    return np.ascontiguousarray(
        np.stack([im[r : r + PATCH, c : c + PATCH] for im in images for r in pos for c in pos])
    ).astype(np.float32)


def _random_patches(images: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """One random 128 × 128 crop per image, flipped at random when ``augment``."""
    size = images.shape[1]
    out = np.empty((len(images), PATCH, PATCH), np.float32)
    for k, image in enumerate(images):
        r, c = rng.integers(0, size - PATCH + 1, 2)
        patch = image[r : r + PATCH, c : c + PATCH]
        if augment:
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            if rng.random() < 0.5:
                patch = patch[::-1]
        out[k] = patch
    return out
