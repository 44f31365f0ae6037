"""The coil paper's baseline: a plain convolutional stack over the 264 × 18 coating map."""

from __future__ import annotations

import torch
from torch import nn

from ml.matrix import N_SECTIONS


class CoilCNN(nn.Module):
    """``depth`` 3×3 convolutions (the paper found 10 best), batch norm, ReLU; global average and
    global max pooling (a thin spot anywhere on the coil must be able to decide) and one logit.

    Downsampling is along the coil's length only, so every one of the 18 sensors keeps its own
    column, and it is done by the convolutions themselves (stride 2 along the length) rather than by
    pooling layers: half the arithmetic and no extra pass over memory, which is what lets a 2-core
    box assess thousands of coils a second. A NOK needs a run of several thin sections, which a
    stride-2 3×3 convolution cannot step over.
    """

    def __init__(self, depth: int = 4, width: int = 8, max_width: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, length, downsampled = 1, N_SECTIONS, 0
        every = 1 if depth <= 5 else 2
        for i in range(depth):
            stride = 2 if (i % every == 0 and length >= 16) else 1
            out = min(width * 2 ** (downsampled + (stride == 2) - 1), max_width) if i else width
            layers += [
                nn.Conv2d(channels, out, 3, stride=(stride, 1), padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
            if stride == 2:
                length = (length + 1) // 2
                downsampled += 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)
