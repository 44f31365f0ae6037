"""The segmentation network of the contrastive defect-segmentation paper, as a plain torch module.

An encoder of residual blocks with squeeze-and-excitation (channels w, 2w, 4w, 8w; the paper's w = 32)
and max pooling, a bottleneck of 16w channels, a decoder of transposed convolutions with concatenated
skip connections, and a 1 × 1 segmentation head giving one logit per pixel. The projection head maps
the last decoder features to unit-length embeddings for the contrastive loss; it is used only in
training and costs nothing at inference. SE lets a block weight its channels by the whole image's
context, which helps with low-contrast defects such as the "uneven" tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class ResidualSEBlock(nn.Module):
    """Two 3 × 3 convolutions with batch norm, SE on the result, plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            SqueezeExcitation(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ContrastiveSegNet(nn.Module):
    """(B, 1, H, W) in [0, 1], H and W multiples of 2**depth → (B, 1, H, W) defect logits."""

    def __init__(self, width: int = 32, depth: int = 4, proj_dim: int = 64):
        super().__init__()
        channels = [width * 2**i for i in range(depth)]
        self.depth = depth
        self.encoder = nn.ModuleList()
        c_prev = 1
        for c in channels:
            self.encoder.append(ResidualSEBlock(c_prev, c))
            c_prev = c
        self.bottleneck = ResidualSEBlock(c_prev, 2 * c_prev)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        c_prev = 2 * c_prev
        for c in reversed(channels):
            self.up.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            self.decoder.append(ResidualSEBlock(2 * c, c))
            c_prev = c
        self.head = nn.Conv2d(width, 1, 1)
        # start from p(defect) ≈ 0.05, the rare class's prior, not 0.5: otherwise the first hundreds of
        # steps only teach the network that most pixels are background
        nn.init.constant_(self.head.bias, -3.0)
        self.projection = nn.Sequential(
            nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, proj_dim, 1)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder feature map, (B, width, H, W)."""
        multiple = 2**self.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and unit-length pixel embeddings (B, proj_dim, H, W) from the projection head."""
        f = self.features(x)
        return self.head(f), F.normalize(self.projection(f), dim=1)
