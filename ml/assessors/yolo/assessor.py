"""``yolo``: the coil paper's deep-transfer-learning model (§3.2), YOLOv8 classification on the matrix
rendered as a grayscale image, NOK:OK class weights 5:1, Adam, at most 50 epochs with early stopping.

**Transfer needs a weights file.** With ``weights`` set to a YOLOv8-cls checkpoint on disk (e.g. a
``yolov8s-cls.pt`` placed there by the user) the network starts from it and its first ``freeze`` layers
(paper: 7 of 10) keep their pretrained weights. Without one, the network is built from ultralytics'
yaml with random weights and trains from scratch: no transfer, and no freezing either (freezing random
layers would only pin random features). Nothing is ever downloaded. For ImageNet transfer that works
offline out of the box, use the ``effnet`` assessor.

Freezing also applies when ReTrain warm-starts from a trained champion: its first ``freeze`` layers are
kept and the rest fine-tuned on the new data.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ml.assessors.base import Assessor, FitCallback, FitReport
from ml.assessors.matrix_fit import MatrixSettings
from ml.assessors.torch_classifier import TorchClassifierAssessor
from ml.assessors.yolo.torch_model import N_LAYERS, YoloClassifier, ultralytics_offline
from ml.dataset import CoilDataset
from ml.training.render import render_gray

Start = Literal["scratch", "file", "init"]


class YoloSettings(MatrixSettings):
    epochs: int = Field(50, ge=1, le=500)
    lr: float = Field(
        3e-4,
        gt=0,
        lt=1,
        description="Adam's step; from scratch, YOLOv8s at the shared 1e-3 sometimes never left chance on the "
        "validation split (ROC-AUC 0.44 and 0.57 on the development data of lines 3 and 4; 0.89 and 0.79 at 3e-4)",
    )
    size: Literal["n", "s"] = Field("s", description="YOLOv8 scale; the paper's best was s")
    imgsz: int = Field(
        64,
        ge=16,
        le=640,
        description="side of the square image the matrix is rendered to; YOLOv8 halves it five times, so at 32 px "
        "its last blocks see 1 × 1 maps and from scratch it did not learn (gold ROC-AUC 0.50 against 0.96 at 64)",
    )
    render: Literal["resize", "tile"] = Field("tile", description="how 264 × 18 becomes a square (ml.training.render)")
    freeze: int = Field(7, ge=0, le=N_LAYERS - 1, description="first k of 10 layers frozen when starting from weights")
    weights: str | None = Field(None, description="YOLOv8-cls checkpoint on disk to start from (never downloaded)")


class YoloAssessor(TorchClassifierAssessor):
    key = "yolo"
    Settings = YoloSettings
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 8, "size": "n"}

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        self._start: Start | None = None  # only set while fitting: where the network's weights come from
        self._pretrained: dict[str, Any] | None = None

    def fit(
        self,
        dataset: CoilDataset,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        s: YoloSettings = self.settings  # type: ignore[assignment]
        self._start = "init" if init is not None else ("file" if s.weights else "scratch")
        self._pretrained = None
        try:
            report = super().fit(dataset, init=init, device=device, callback=callback)
        finally:
            start, self._start = self._start, None
        self.runtime.update(
            start=start,
            frozen_layers=s.freeze if start != "scratch" else 0,
            pretrained=self._pretrained,
            ultralytics=_ultralytics_version(),
        )
        return report

    def build_network(self) -> nn.Module:
        s: YoloSettings = self.settings  # type: ignore[assignment]
        net = YoloClassifier(size=s.size, channels=1)
        if self._start == "file" and s.weights:
            self._pretrained = net.load_pretrained(s.weights)
        return net

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter] | None:
        s: YoloSettings = self.settings  # type: ignore[assignment]
        assert isinstance(net, YoloClassifier)
        return net.freeze(s.freeze if self._start in ("file", "init") else 0)

    def to_input(self, x: np.ndarray) -> torch.Tensor:
        s: YoloSettings = self.settings  # type: ignore[assignment]
        return render_gray(x, s.imgsz, s.render)


def _ultralytics_version() -> str:
    ultralytics_offline()  # the one place ultralytics is first imported
    import ultralytics

    return ultralytics.__version__
