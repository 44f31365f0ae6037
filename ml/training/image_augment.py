"""Surface images as tensors for the ImageNet backbone, and the augmentation the few-shot papers train with.

Images arrive as (H, W) float32 arrays in [0, 1] of any size. They are resized once to the model's
square size and kept gray (B, 1, S, S); :func:`standardize` puts the gray into the three channels with
the ImageNet statistics only at the network's door, so augmentation works on the plain gray image.

:func:`augment` is one batched ``grid_sample`` per batch: a random resized crop (the self-contrastive
paper's "adjacent, local and global views"), a rotation by a multiple of 90° and flips (its affine
operators; NEU's textures have no up or down), an optional small free rotation (the RMCSAM paper's
≤ 25°), then brightness and contrast jitter. Draws come from a ``torch.Generator``, so a seed fixes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ml.training.render import IMAGENET_MEAN, IMAGENET_STD


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """A list of (H, W) images in [0, 1] (uint8 is scaled, a colour axis averaged) → (N, 1, size, size)."""
    out = torch.empty((len(images), 1, size, size), dtype=torch.float32)
    for i, image in enumerate(images):
        a = np.asarray(image)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        if a.ndim == 3:
            a = a.mean(axis=-1)
        if a.ndim != 2:
            raise ValueError(f"image {i} has shape {a.shape}; expected (H, W)")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i] = t[0]
    return out.clamp_(0.0, 1.0)


def standardize(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) gray in [0, 1] → (B, 3, S, S) standardized as the ImageNet network expects."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=gray.dtype, device=gray.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=gray.dtype, device=gray.device).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std


DIHEDRAL_VIEWS = (1, 2, 4, 8)


def dihedral_views(gray: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` of the square's eight symmetries of a (B, C, S, S) batch, stacked as (n·B, C, S, S).

    Test-time counterpart of :func:`augment`'s 90° turns and flips: a network trained to ignore them can
    average its embedding over them. Order: identity, horizontal flip, vertical flip, 180° turn (n = 4 is
    the flips), then the 90° turn, 270° turn and the two transposes."""
    if n not in DIHEDRAL_VIEWS:
        raise ValueError(f"views must be one of {DIHEDRAL_VIEWS}, got {n}")
    turned = gray.transpose(-1, -2)
    views = [gray, gray.flip(-1), gray.flip(-2), gray.flip(-1, -2), turned.flip(-1), turned.flip(-2), turned,
             turned.flip(-1, -2)]  # fmt: skip
    return torch.cat(views[:n])


@dataclass(frozen=True)
class AugmentConfig:
    min_crop: float = 0.6  # side of the random crop as a fraction of the image's side, at least
    rot90: bool = True  # rotations by 0, 90, 180 or 270°
    flips: bool = True  # horizontal and vertical flips, each with probability 0.5
    max_degrees: float = 0.0  # a further free rotation drawn in [-max_degrees, max_degrees]
    brightness: float = 0.2  # intensity × (1 + U(-b, b))
    contrast: float = 0.2  # deviation from the image mean × (1 + U(-c, c))


def augment(gray: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A randomly transformed copy of a (B, 1, S, S) gray batch, each image with its own draws."""
    b = gray.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    scale = uniform(config.min_crop, 1.0)
    angle = torch.deg2rad(uniform(-config.max_degrees, config.max_degrees))
    if config.rot90:
        angle = angle + (math.pi / 2) * torch.randint(0, 4, (b,), generator=generator).float()
    flip_x = torch.ones(b)
    flip_y = torch.ones(b)
    if config.flips:
        flip_x = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    # the crop's centre may move as far as keeps it inside the image
    shift_x = (1 - scale) * uniform(-1.0, 1.0)
    shift_y = (1 - scale) * uniform(-1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_y, shift_x], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, shift_y], dim=1),
        ],
        dim=1,
    ).to(gray)
    grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
    out = F.grid_sample(gray, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if config.contrast > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + (out - mean) * (1 + uniform(-config.contrast, config.contrast)).view(b, 1, 1, 1).to(out)
    if config.brightness > 0:
        out = out * (1 + uniform(-config.brightness, config.brightness)).view(b, 1, 1, 1).to(out)
    return out.clamp(0.0, 1.0)
