"""What the two image assessors that judge pixels share: a per-pixel map, a pixel threshold, and a coil's
p(NOK) from its worst image.

``ssim_ae`` (a residual map) and ``contrastive_seg`` (a defect-probability map) both turn a map into a
score per image with a pixel threshold learned at fit time. The threshold is saved inside the weights
file, so the manifest's checksum covers it, and repeated in the manifest for people to read.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ml.assessors.base import AssessBatch, Assessor, InputKind
from ml.assessors.manifest import Manifest

WEIGHTS = "weights.pt"


class PixelMapAssessor(Assessor):
    consumes: ClassVar[InputKind] = "image"
    weight_files = (WEIGHTS,)
    net: nn.Module | None
    pixel_threshold: float

    @abstractmethod
    def build_network(self) -> nn.Module:
        """A fresh, untrained network of this assessor's settings."""

    @abstractmethod
    def image_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw p(NOK) of each image."""

    def predict_raw(self, batch: AssessBatch) -> np.ndarray:
        """A coil's raw p(NOK) is its worst image's; NaN (abstain) for a coil without images."""
        if self.net is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        out = np.full(len(batch), np.nan)
        if batch.images is None:
            return out
        for i, coil_images in enumerate(batch.images):
            if coil_images:
                out[i] = float(self.image_scores(list(coil_images)).max())
        return out

    def manifest(self) -> Manifest:
        manifest = super().manifest()
        manifest.calibration["pixel_threshold"] = self.pixel_threshold
        return manifest

    def save_weights(self, directory: Path) -> None:
        if self.net is None:
            raise RuntimeError("nothing to save: the assessor has not been fitted")
        torch.save({"net": self.net.state_dict(), "pixel_threshold": self.pixel_threshold}, directory / WEIGHTS)

    def load_weights(self, directory: Path) -> None:
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        net = self.build_network()
        net.load_state_dict(state["net"])
        self.net = net.eval()
        self.pixel_threshold = float(state["pixel_threshold"])
