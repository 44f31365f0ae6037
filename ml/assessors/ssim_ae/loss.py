"""SSIM and the structural dissimilarity (DSSIM) loss of Bergmann et al. (2019).

SSIM compares luminance, contrast and structure in a local window, so a residual built on it reacts
to a change of texture (a crack, a blowhole) rather than to a small shift of brightness, which an
ℓ2 residual flags everywhere. The window is square and uniform, of side 7, 11 or 15 (the anomaly
paper's evaluation windows); constants are Wang et al.'s, K1 = 0.01 and K2 = 0.03 for a data range of 1.
Maps keep the input size (reflect padding) so that a residual pixel lines up with an image pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

C1 = 0.01**2
C2 = 0.03**2


def _local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    pad = window // 2
    return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, stride=1)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-pixel SSIM of two (B, 1, H, W) batches in [0, 1], same shape as the input, values in [-1, 1]."""
    if window % 2 == 0 or window < 3:
        raise ValueError(f"the SSIM window must be odd and at least 3, got {window}")
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x**2
    var_y = _local_mean(y * y, window) - mu_y**2
    cov = _local_mean(x * y, window) - mu_x * mu_y
    num = (2 * mu_x * mu_y + C1) * (2 * cov + C2)
    den = (mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2)
    return num / den


def residual_map(x: torch.Tensor, reconstruction: torch.Tensor, window: int = 11) -> torch.Tensor:
    """The anomaly map 1 − SSIM, clipped to [0, 1]: high where the reconstruction lost the structure."""
    return (1.0 - ssim_map(x, reconstruction, window)).clamp(0.0, 1.0)


def dssim_loss(x: torch.Tensor, reconstruction: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Mean structural dissimilarity (1 − SSIM) / 2 over the batch, the autoencoder's training loss."""
    return ((1.0 - ssim_map(x, reconstruction, window)) / 2).mean()
