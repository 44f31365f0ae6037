"""The two losses of the self-contrastive margin paper, as plain functions of embeddings and cosines.

``self_contrastive_loss``
    SimCLR's NT-Xent (Eq. 1) between the image and each of its two augmented views and between the two
    views, averaged (Eq. 2): every other view in the batch is a negative, τ = 0.5.
``arcface_loss``
    ArcFace's additive angular margin (Eq. 4): the true class's logit is s·cos(θ + m), the others s·cos θ,
    with the weight vectors and the embedding on the unit sphere; the margin forces the classes apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the 2N embeddings of ``a`` and ``b`` (N × d each); row i of ``a`` and of ``b`` are a positive pair.

    Each of the 2N views is a softmax over the 2N − 1 others with its partner as the target, averaged
    over all 2N (both directions of every pair), as in SimCLR.
    """
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def self_contrastive_loss(
    original: torch.Tensor, view_1: torch.Tensor, view_2: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """L_Con of Eq. 2: the mean of l(x, x_i), l(x, x_j) and l(x_i, x_j) over the batch."""
    return (
        nt_xent(original, view_1, temperature)
        + nt_xent(original, view_2, temperature)
        + nt_xent(view_1, view_2, temperature)
    ) / 3


def arc_margin_logits(
    cosine: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, scale: float = 30.0
) -> torch.Tensor:
    """s·cos(θ_y + m) for the true class and s·cos θ_j for the others, from (B, C) cosines.

    Past θ = π − m, cos(θ + m) would grow again with θ; there the logit continues as cos θ − m·sin m, the
    monotone extension of the reference ArcFace code, so a badly placed sample is still pulled back.
    """
    cosine = cosine.clamp(-1.0, 1.0)
    sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-7))
    with_margin = cosine * math.cos(margin) - sine * math.sin(margin)
    with_margin = torch.where(
        cosine > math.cos(math.pi - margin), with_margin, cosine - math.sin(math.pi - margin) * margin
    )
    target = F.one_hot(labels, num_classes=cosine.shape[1]).bool()
    return scale * torch.where(target, with_margin, cosine)


def arcface_loss(cosine: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, scale: float = 30.0) -> torch.Tensor:
    """L_Arc of Eq. 4: cross-entropy on the margin logits."""
    return F.cross_entropy(arc_margin_logits(cosine, labels, margin, scale), labels)
