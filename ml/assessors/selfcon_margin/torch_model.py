"""The self-contrastive margin network: backbone, MLP projection to the embedding, and the ArcFace head.

The paper's ResNet-50 becomes EfficientNet-Lite0 (ImageNet weights from the installed package). Its
pooled 1280 features go through the MLP projection to a 128-d embedding (Table I), on which both losses
work: NT-Xent between views, and the angular margin against one unit weight vector per class. Plain
torch; the losses are in ``loss.py`` and the training in the assessor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ml.assessors.effnet.torch_model import EffNetLite0

FEATURES = 1280  # channels of EfficientNet-Lite0's head convolution


class ArcMarginHead(nn.Module):
    """One weight vector per class; outputs the cosine between it and the embedding (the margin is the loss's)."""

    def __init__(self, embedding_dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding, dim=1) @ F.normalize(self.weight, dim=1).T


class SelfConMarginNet(nn.Module):
    def __init__(
        self, n_classes: int, image_size: int, *, embedding_dim: int = 128, hidden: int = 512, pretrained: bool = True
    ) -> None:
        super().__init__()
        self.backbone = EffNetLite0(image_size, pretrained=pretrained)
        self.projection = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embedding_dim)
        )
        self.head = ArcMarginHead(embedding_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-standardized images → (B, embedding_dim), not normalized."""
        return self.projection(self.backbone.net.extract_features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_classes) cosines between each image's embedding and each class's weight vector."""
        return self.head(self.embed(x))

    def freeze(self, stages: int) -> list[nn.Parameter]:
        """Keep the backbone's stem and first ``stages`` stages at their weights; return what trains."""
        self.backbone.freeze(stages)
        self.backbone.net._fc.requires_grad_(False)  # the backbone's own one-logit layer is not on this path
        return [p for p in self.parameters() if p.requires_grad]
