"""The losses of the contrastive defect-segmentation paper.

``combo_loss`` = 0.3 · BCE + 0.7 · Dice (the paper's weights): BCE trains each pixel, Dice (over the
whole batch, eq. 3) keeps the rare defect pixels from being drowned by the background.

``proposal_contrastive_loss`` is the InfoNCE term (eq. 5, τ = 0.1) that separates defect from
background embeddings. For each class present in the batch, sampled pixel embeddings are the anchors,
the mean embedding of their class (the class "proposal", as in ContrastMask) is the positive key, and
sampled pixels of the other class are the negatives; half of the background samples are taken from a
band around the defects, the hard negatives a plain pixel loss gets wrong first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)


def combo_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.3, dice_weight: float = 0.7):
    """α · BCE + β · Dice of (B, 1, H, W) logits against a {0, 1} target of the same shape."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce_weight * bce + dice_weight * dice_loss(logits, target)


def _sample(index: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if len(index) <= n:
        return index
    return index[torch.randperm(len(index), generator=generator, device="cpu")[:n].to(index.device)]


def proposal_contrastive_loss(
    embeddings: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.1,
    max_samples: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """InfoNCE between defect and background pixel embeddings; 0 when the batch lacks either class.

    ``embeddings`` (B, D, H, W) unit length, ``target`` (B, 1, H, W) in {0, 1}.
    """
    generator = generator or torch.Generator().manual_seed(0)
    d = embeddings.shape[1]
    z = embeddings.permute(0, 2, 3, 1).reshape(-1, d)
    fg = target.reshape(-1) > 0.5
    if not fg.any() or fg.all():
        return embeddings.sum() * 0.0
    band = (F.max_pool2d(target, 7, stride=1, padding=3) > 0.5).reshape(-1) & ~fg
    fg_idx = torch.nonzero(fg).squeeze(1)
    bg_idx = torch.nonzero(~fg).squeeze(1)
    band_idx = torch.nonzero(band).squeeze(1)
    fg_s = _sample(fg_idx, max_samples, generator)
    hard = _sample(band_idx, max_samples // 2, generator)
    bg_s = torch.cat([hard, _sample(bg_idx, max_samples - len(hard), generator)])
    losses = []
    for anchors, others in ((fg_s, bg_s), (bg_s, fg_s)):
        a = z[anchors]
        key = F.normalize(a.mean(0, keepdim=True), dim=1)  # the class proposal
        pos = (a @ key.T) / temperature  # (n, 1)
        neg = (a @ z[others].T) / temperature  # (n, m)
        logits = torch.cat([pos, neg], dim=1)
        labels = torch.zeros(len(a), dtype=torch.long, device=a.device)
        losses.append(F.cross_entropy(logits, labels))
    return torch.stack(losses).mean()
