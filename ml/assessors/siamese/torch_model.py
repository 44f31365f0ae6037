"""The coil paper's contrastive Siamese network (§3.3): one CNN encoder shared by both branches, and a
similarity score in [0, 1] computed from the two embeddings.

The encoder follows the paper's architecture findings (§5.4): batch normalization after every
convolution, global average pooling into the embedding, and moderate dropout (0.3–0.5) before the dense
layers. Like the baseline CNN it downsamples along the coil's length only, so every sensor keeps its
own column, and with strided convolutions rather than pooling layers, which keeps it fast on a CPU.

``pooling="avgmax"`` (the assessor's default) puts the global maximum beside the average. On simulated
coils the average alone dilutes a thin spot of a few sections over the whole coil until the pair loss
barely moves (validation NOK-F1 ≈ 0.1–0.5 after 10 epochs, depending on the head), while average and
maximum together learn within a few epochs (≈ 0.8).

The similarity head (1 = same class, through a sigmoid) is one of

- ``absdiff``: the classic Siamese head (Koch et al.), learned weights on |a − b|;
- ``cosine``: a learned scale and offset on the cosine of the two embeddings (the default: its gradient
  does not depend on the sign of a near-zero difference, so it leaves the initial plateau quickly);
- ``distance``: a learned offset minus a learned scale times the mean squared difference.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ml.matrix import N_SECTIONS

Pooling = Literal["avg", "max", "avgmax"]
Similarity = Literal["absdiff", "cosine", "distance"]


class SiameseEncoder(nn.Module):
    """Normalized (B, 1, 264, 18) → (B, embedding_dim)."""

    def __init__(
        self,
        depth: int = 4,
        width: int = 8,
        max_width: int = 64,
        embedding_dim: int = 32,
        dropout: float = 0.3,
        pooling: Pooling = "avg",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, length = 1, N_SECTIONS
        for i in range(depth):
            stride = 2 if length >= 16 else 1
            out = min(width * 2**i, max_width)
            layers += [
                nn.Conv2d(channels, out, 3, stride=(stride, 1), padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
            length = (length + 1) // 2 if stride == 2 else length
        self.features = nn.Sequential(*layers)
        self.pooling = pooling
        pooled = 2 * channels if pooling == "avgmax" else channels
        hidden = max(embedding_dim, channels)
        self.dense = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(pooled, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.pooling == "avg":
            pooled = f.mean(dim=(2, 3))
        elif self.pooling == "max":
            pooled = f.amax(dim=(2, 3))
        else:
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.dense(pooled)


class SiameseNet(nn.Module):
    """Twin branches (one shared encoder) and the similarity head."""

    def __init__(self, similarity: Similarity = "cosine", **encoder_options) -> None:
        super().__init__()
        self.encoder = SiameseEncoder(**encoder_options)
        self.embedding_dim = self.encoder.dense[-1].out_features
        self.similarity = similarity
        self.head = nn.Linear(self.embedding_dim, 1)
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def similarity_logit(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logit of "same class" for embeddings ``a`` and ``b`` (broadcasting: (N, D) with (N, D) or (1, D))."""
        if self.similarity == "absdiff":
            return self.head((a - b).abs()).squeeze(-1)
        if self.similarity == "cosine":
            return self.scale * nn.functional.cosine_similarity(a, b, dim=-1) + self.bias
        return self.bias - self.scale * (a - b).pow(2).mean(dim=-1)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Similarity logits of the pairs (left[i], right[i]); both branches go through the encoder in one
        batch, so batch normalization sees both sides together."""
        e = self.embed(torch.cat([left, right]))
        return self.similarity_logit(e[: len(left)], e[len(left) :])
