"""The coil matrix as a square image, for the image networks (YOLOv8 classification, EfficientNet).

The coil paper normalizes each 264 × 18 matrix with the global population limits and turns it into a
grayscale image; it also tried "interpolation and tiling" into a 264 × 264 square. Two renderings:

``resize``
    the whole matrix interpolated to ``size`` × ``size`` (bilinear, anti-aliased, so that a short thin
    run along the coil is averaged into its pixel rather than skipped between two samples). Square
    pixels stretch the 18 sensors across the image and squeeze the 264 sections together.

``tile``
    the coil's length cut into ``k`` consecutive segments laid side by side (k = 4: 66 sections ×
    4 · 18 sensors, almost square), then interpolated to ``size`` × ``size``. Every sensor keeps its
    column within its segment and neighbouring sections stay neighbours, and at sizes around 64 the
    image keeps about the matrix's full resolution, where ``resize`` to 64 averages four sections into
    each pixel row.

Inputs are normalized (B, 264, 18) float32 in [0, 1]; outputs (B, C, size, size) float32 tensors.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

RenderMode = Literal["resize", "tile"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_count(length: int, width: int) -> int:
    """How many segments make the tiled image closest to square: k with (length / k) ≈ k · width."""
    return max(1, round(math.sqrt(length / width)))


def tile(x: torch.Tensor) -> torch.Tensor:
    """(B, L, W) → (B, ceil(L / k), k · W): segment i of the length becomes column block i.

    A length that does not divide into k is padded by repeating the tail section.
    """
    b, length, width = x.shape
    k = tile_count(length, width)
    segment = math.ceil(length / k)
    if segment * k != length:
        x = torch.cat([x, x[:, -1:].expand(b, segment * k - length, width)], dim=1)
    return x.reshape(b, k, segment, width).permute(0, 2, 1, 3).reshape(b, segment, k * width)


def render_gray(x: np.ndarray | torch.Tensor, size: int, mode: RenderMode = "resize") -> torch.Tensor:
    """Normalized (B, 264, 18) → grayscale (B, 1, size, size) in [0, 1]."""
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float32)
    if mode == "tile":
        t = tile(t)
    elif mode != "resize":
        raise ValueError(f"unknown render mode {mode!r}; use 'resize' or 'tile'")
    t = t[:, None]
    if t.shape[-2:] == (size, size):
        return t.contiguous()
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def render_rgb(
    x: np.ndarray | torch.Tensor,
    size: int,
    mode: RenderMode = "resize",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Normalized (B, 264, 18) → (B, 3, size, size): the gray image in each channel, standardized with the
    channel statistics an ImageNet network was trained with."""
    gray = render_gray(x, size, mode)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (gray - m) / s
