"""``selfcon_margin``: defect-type recognition from few images with a self-contrastive branch and an
angular-margin head (Phuong, Tin & Trang, "Improving image representation for surface defect
recognition with small data", 2024), EfficientNet-Lite0 in place of ResNet-50.

Each training batch holds every image and two augmented views of it (random resized crops, 90° turns,
flips; ``ml.training.image_augment``). The total loss is α·L_Con + β·L_Arc with α = 3β = 0.75: NT-Xent
between the image and its two views and between the views (τ = 0.5), and ArcFace on the embeddings of
all three (m = 0.5, scale ``scale``). Table I's settings are the defaults: batch 32, Adam at 5e-4,
100 epochs, 128-d embedding.

Classification is the paper's: the trained network embeds the training images as a reference database,
and an image belongs to the class whose references it resembles most on average (cosine). The
probabilities are softmax(scale · mean cosine per class). ``classify="centers"`` uses the ArcFace class
vectors instead. The references are saved beside the weights (``references.pt``). ``views`` > 1 embeds
each image and reference as the mean over its flips and 90° turns (not in the paper): the training
augmentation teaches the network to ignore them, so the mean is a steadier direction, at ``views`` times
the prediction cost; on NEU the paper's own 200 px image size gained more (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ml.assessors.image_classifier import WEIGHTS, ImageClassifierAssessor, ImageClassifierSettings
from ml.assessors.selfcon_margin.loss import arcface_loss, self_contrastive_loss
from ml.assessors.selfcon_margin.torch_model import SelfConMarginNet
from ml.training.image_augment import augment, dihedral_views, standardize

REFERENCES = "references.pt"


class SelfConMarginSettings(ImageClassifierSettings):
    epochs: int = Field(100, ge=1, le=500, description="the paper trains 100 epochs")
    temperature: float = Field(0.5, gt=0, le=1, description="τ of NT-Xent")
    margin: float = Field(0.5, ge=0, lt=1.5, description="ArcFace's additive angular margin m (radians)")
    scale: float = Field(30.0, gt=0, le=128, description="ArcFace's scale s (also the softmax scale at inference)")
    alpha: float = Field(0.75, ge=0, description="weight of the self-contrastive loss")
    beta: float = Field(0.25, ge=0, description="weight of the angular-margin loss")
    embedding_dim: int = Field(128, ge=2, le=1024)
    hidden: int = Field(512, ge=8, le=4096, description="hidden units of the MLP projection")
    classify: Literal["references", "centers"] = Field(
        "references", description="mean cosine to the training images of each class (paper), or to the ArcFace vectors"
    )
    max_references: int = Field(200, ge=1, description="reference images kept per class at most (random draw)")
    views: Literal[1, 2, 4, 8] = Field(
        1, description="embed each image (and reference) as the mean over this many flips and 90° turns of it"
    )


class SelfConMarginAssessor(ImageClassifierAssessor):
    key = "selfcon_margin"
    Settings = SelfConMarginSettings
    weight_files = (WEIGHTS, REFERENCES)
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 3, "imgsz": 64}

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        self.references: torch.Tensor | None = None  # (R, d) unit embeddings of training images
        self.reference_labels: torch.Tensor | None = None  # (R,) their classes

    def build_network(self, n_classes: int, pretrained: bool) -> nn.Module:
        s: SelfConMarginSettings = self.settings  # type: ignore[assignment]
        self.references = self.reference_labels = None  # a new network makes old references meaningless
        return SelfConMarginNet(
            n_classes, s.imgsz, embedding_dim=s.embedding_dim, hidden=s.hidden, pretrained=pretrained
        )

    def batch_loss(
        self, net: nn.Module, gray: torch.Tensor, labels: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        s: SelfConMarginSettings = self.settings  # type: ignore[assignment]
        assert isinstance(net, SelfConMarginNet)
        config = self.augment_config
        views = torch.cat([gray, augment(gray, config, rng), augment(gray, config, rng)])
        embedding = net.embed(standardize(views))  # one pass, so batch norm sees all three views together
        original, view_1, view_2 = embedding.chunk(3)
        contrastive = self_contrastive_loss(original, view_1, view_2, s.temperature)
        margin = arcface_loss(net.head(embedding), labels.repeat(3), s.margin, s.scale)
        return s.alpha * contrastive + s.beta * margin

    def class_probabilities(self, net: nn.Module, gray: torch.Tensor) -> torch.Tensor:
        s: SelfConMarginSettings = self.settings  # type: ignore[assignment]
        assert isinstance(net, SelfConMarginNet)
        embedding = self._embed(net, gray)
        if s.classify == "references" and self.references is not None and self.reference_labels is not None:
            cosine = F.normalize(embedding, dim=1) @ self.references.to(embedding).T
            n_classes = net.head.weight.shape[0]
            totals = torch.zeros((len(embedding), n_classes), dtype=cosine.dtype, device=cosine.device)
            labels = self.reference_labels.to(cosine.device)
            totals.index_add_(1, labels, cosine)
            counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).to(cosine)
            score = totals / counts
        else:  # the ArcFace class vectors (also what validation uses while training, before references exist)
            score = net.head(embedding)
        return torch.softmax(s.scale * score, dim=1)

    def after_fit(self, net: nn.Module, gray: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Embed (up to ``max_references`` per class of) the training images as the reference database."""
        s: SelfConMarginSettings = self.settings  # type: ignore[assignment]
        assert isinstance(net, SelfConMarginNet)
        rng = np.random.default_rng(s.seed)
        keep = np.sort(
            np.concatenate(
                [
                    rng.permutation(np.flatnonzero(labels.numpy() == c))[: s.max_references]
                    for c in np.unique(labels.numpy())
                ]
            )
        )
        net.eval()
        with torch.no_grad():
            embedding = torch.cat([self._embed(net, gray[keep[i : i + 64]]) for i in range(0, len(keep), 64)])
        self.references = F.normalize(embedding, dim=1).contiguous()
        self.reference_labels = labels[keep].clone()
        return {"references": len(keep), "classify": s.classify}

    def _embed(self, net: SelfConMarginNet, gray: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of a gray batch, averaged over ``views`` symmetric copies (training made the
        network indifferent to them, so the mean is the same direction with less noise)."""
        n = self.settings.views  # type: ignore[attr-defined]
        if n == 1:
            return net.embed(standardize(gray))
        embedding = F.normalize(net.embed(standardize(dihedral_views(gray, n))), dim=1)
        return embedding.view(n, len(gray), -1).mean(dim=0)

    def save_weights(self, directory: Path) -> None:
        if self.references is None or self.reference_labels is None:
            raise RuntimeError("nothing to save: the assessor has not been fitted")
        super().save_weights(directory)
        torch.save({"embeddings": self.references, "labels": self.reference_labels}, directory / REFERENCES)

    def load_weights(self, directory: Path) -> None:
        super().load_weights(directory)
        refs = torch.load(directory / REFERENCES, map_location="cpu", weights_only=True)
        self.references, self.reference_labels = refs["embeddings"], refs["labels"]
