"""The Siamese pair loss of the coil paper (§3.3): binary cross-entropy on the pair similarity.

The paper tried a margin-based contrastive loss too and found it comparable, and reports the simpler
cross-entropy; so does this module. The target is 1 for a same-class pair (OK–OK, NOK–NOK) and 0 for an
OK–NOK pair (the paper notes the convention can be either way). The classes are balanced by the pair
sampling (``ml.training.pairs``); optional per-pair weights keep that balance exact in every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_loss(similarity_logits: torch.Tensor, same: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (weighted) binary cross-entropy of the similarity logits against ``same`` (1 = same class)."""
    return F.binary_cross_entropy_with_logits(similarity_logits.float(), same.float(), weight=weight)
