"""The convolutional autoencoder of Bergmann et al. (2019) for 128 × 128 grayscale patches, as a plain network.

Nine convolutions with leaky ReLU halve the patch four times to 8 × 8 × 128 and end in an 8 × 8
"valid" convolution to a 1 × 1 × ``latent_dim`` bottleneck, the one size the anomaly paper varies
(100, 300, 500): too wide and the network copies defects through, too narrow and it blurs normal
texture. The decoder mirrors the encoder with transposed convolutions and ends in a sigmoid, since the
images are in [0, 1]. No training logic here (that is ``assessor.py``), no loss (``loss.py``).
"""

from __future__ import annotations

import torch
from torch import nn

PATCH = 128


def _conv(c_in: int, c_out: int, k: int, s: int, p: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2, inplace=True)]


def _deconv(c_in: int, c_out: int, k: int, s: int, p: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2, inplace=True)]


class SsimAutoencoder(nn.Module):
    """(B, 1, 128, 128) in [0, 1] → its reconstruction, through a ``latent_dim`` bottleneck."""

    def __init__(self, latent_dim: int = 100, width: int = 32):
        super().__init__()
        w = width
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            *_conv(1, w, 4, 2, 1),  # 64
            *_conv(w, w, 4, 2, 1),  # 32
            *_conv(w, w, 3, 1, 1),
            *_conv(w, 2 * w, 4, 2, 1),  # 16
            *_conv(2 * w, 2 * w, 3, 1, 1),
            *_conv(2 * w, 4 * w, 4, 2, 1),  # 8
            *_conv(4 * w, 2 * w, 3, 1, 1),
            *_conv(2 * w, w, 3, 1, 1),
            nn.Conv2d(w, latent_dim, 8, 1, 0),  # 1 × 1 × latent_dim, linear
        )
        self.decoder = nn.Sequential(
            *_deconv(latent_dim, w, 8, 1, 0),  # 8
            *_conv(w, 2 * w, 3, 1, 1),
            *_conv(2 * w, 4 * w, 3, 1, 1),
            *_deconv(4 * w, 2 * w, 4, 2, 1),  # 16
            *_conv(2 * w, 2 * w, 3, 1, 1),
            *_deconv(2 * w, w, 4, 2, 1),  # 32
            *_conv(w, w, 3, 1, 1),
            *_deconv(w, w, 4, 2, 1),  # 64
            nn.ConvTranspose2d(w, 1, 4, 2, 1),  # 128
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (PATCH, PATCH):
            raise ValueError(f"the autoencoder takes {PATCH} × {PATCH} patches, got {tuple(x.shape[-2:])}")
        return self.decoder(self.encoder(x))
