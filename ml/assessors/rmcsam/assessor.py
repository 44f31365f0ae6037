"""``rmcsam``: defect-type classification with an ImageNet backbone and recursive multi-scale channel-spatial
attention (the ResNet + RMCSAM fine-grained classification paper), EfficientNet-Lite0 in place of ResNet-50.

Trained as that paper trains it: cross-entropy on the classes, Adam at 5e-4, dropout 0.2 before the class
layer, flips, rotations and brightness changes. ``attention=False`` is the plain fine-tuned backbone that
both papers compare against (the benchmark's baseline). Fitting, the coil vote and saving come from
:class:`~ml.assessors.image_classifier.ImageClassifierAssessor`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ml.assessors.image_classifier import ImageClassifierAssessor, ImageClassifierSettings
from ml.assessors.rmcsam.torch_model import RmcsamNet
from ml.training.image_augment import augment, standardize


class RmcsamSettings(ImageClassifierSettings):
    epochs: int = Field(60, ge=1, le=500, description="the paper trains 60 epochs")
    attention: bool = Field(True, description="the RMCSAM module (False: plain fine-tuned backbone)")
    dropout: float = Field(0.2, ge=0, lt=1, description="before the class layer (paper: 0.2)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class RmcsamAssessor(ImageClassifierAssessor):
    key = "rmcsam"
    Settings = RmcsamSettings
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 3, "imgsz": 64}

    def build_network(self, n_classes: int, pretrained: bool) -> nn.Module:
        s: RmcsamSettings = self.settings  # type: ignore[assignment]
        return RmcsamNet(n_classes, s.imgsz, attention=s.attention, dropout=s.dropout, pretrained=pretrained)

    def batch_loss(
        self, net: nn.Module, gray: torch.Tensor, labels: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        s: RmcsamSettings = self.settings  # type: ignore[assignment]
        logits = net(standardize(augment(gray, self.augment_config, rng)))
        return F.cross_entropy(logits, labels, label_smoothing=s.label_smoothing)

    def class_probabilities(self, net: nn.Module, gray: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(standardize(gray)), dim=1)
