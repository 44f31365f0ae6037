"""The RMCSAM network: EfficientNet-Lite0 features, the recursive multi-scale channel-spatial attention
module, global average pooling, dropout and the class layer. Plain torch; training lives in the assessor.

The paper's description (ResNet-50 features, 7 × 7 × 2048 there; 1280 channels here):

channel attention
    global average and global max pooling, a shared MLP with one hidden layer, their sum through a
    sigmoid: one weight per channel (CBAM's channel branch).
spatial attention
    the channel-wise mean and max maps side by side, a k × k convolution and a sigmoid: one weight per
    position.
combination
    both weights multiplied into the features and the two products added, F' = F·Mc(F) + F·Ms(F).

"Multi-scale" is the three sizes the paper lists — MLP hidden 256 / 128 / 64 and kernels 3 / 5 / 7;
"recursive" is read as applying the three scales in turn, each on the previous one's output. With
the sigmoids near 0.5 at the start, each step keeps the features' scale (0.5 F + 0.5 F = F), so the
pretrained features reach the classifier unchanged before the attention has learned anything.

``attention=False`` leaves the module out: the plain fine-tuned backbone (the papers' baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from ml.assessors.effnet.torch_model import EffNetLite0

FEATURES = 1280  # channels of EfficientNet-Lite0's head convolution
SCALES = ((256, 3), (128, 5), (64, 7))  # (hidden units of the channel MLP, spatial kernel) per recursion


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(weights)[:, :, None, None]


class SpatialAttention(nn.Module):
    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class RMCSAM(nn.Module):
    """Recursive multi-scale channel-spatial attention; (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, channels: int = FEATURES, scales: tuple[tuple[int, int], ...] = SCALES) -> None:
        super().__init__()
        self.channel = nn.ModuleList(ChannelAttention(channels, hidden) for hidden, _ in scales)
        self.spatial = nn.ModuleList(SpatialAttention(kernel) for _, kernel in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for channel, spatial in zip(self.channel, self.spatial, strict=True):
            x = x * channel(x) + x * spatial(x)
        return x


class RmcsamNet(nn.Module):
    """Backbone features → RMCSAM (optional) → global average pooling → dropout → class logits."""

    def __init__(
        self, n_classes: int, image_size: int, *, attention: bool = True, dropout: float = 0.2, pretrained: bool = True
    ) -> None:
        super().__init__()
        self.backbone = EffNetLite0(image_size, pretrained=pretrained)
        self.attention = RMCSAM() if attention else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(FEATURES, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-standardized images → (B, n_classes) logits."""
        features = self.attention(self.backbone.net.extract_features(x))
        return self.classifier(self.dropout(features.mean(dim=(2, 3))))

    def freeze(self, stages: int) -> list[nn.Parameter]:
        """Keep the backbone's stem and first ``stages`` stages at their weights; return what trains."""
        self.backbone.freeze(stages)
        # the backbone's own one-logit layer is not used on this path
        self.backbone.net._fc.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]
