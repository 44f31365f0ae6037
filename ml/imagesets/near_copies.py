"""Shots of the same physical object: an image set can hold several photographs of one tile (the magnetic-tile
set's ``expN`` runs), and a split that puts one shot in training and another in validation or test measures
memory, not generalization. Two images count as shots of one object when their small thumbnails correlate
above ``NEAR``; the relation is closed transitively."""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from ml.imagesets.folder import resize_image

NEAR = 0.98  # above this thumbnail correlation two images are taken for shots of one object
THUMB_SIDE = 24  # small enough that exposure and a few pixels of shift do not matter


def thumbnails(images: list[np.ndarray], index: np.ndarray | None = None) -> np.ndarray:
    """Zero-mean, unit-norm ``THUMB_SIDE`` × ``THUMB_SIDE`` thumbnails: their dot product is a correlation."""
    index = np.arange(len(images)) if index is None else index
    x = np.stack([resize_image(images[i], THUMB_SIDE).ravel().astype(np.float64) for i in index])
    x -= x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


def near_copy_groups(images: list[np.ndarray], index: np.ndarray | None = None) -> np.ndarray:
    """A group number (0, 1, …) for each image of ``index`` (default: all): near-copies, transitively."""
    x = thumbnails(images, index)
    return connected_components(csr_matrix(x @ x.T > NEAR), directed=False)[1]


def group_holdout(groups: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): whole groups, drawn at random, held out until ``share`` of the images is
    reached (at least one group, and never all of them)."""
    ids = rng.permutation(np.unique(groups))
    sizes = np.array([np.sum(groups == g) for g in ids])
    n_out = max(1, min(int(np.searchsorted(np.cumsum(sizes), share * len(groups))) + 1, len(ids) - 1))
    out = np.isin(groups, ids[:n_out])
    return np.flatnonzero(~out), np.flatnonzero(out)
