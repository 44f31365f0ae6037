"""Balanced pairs for a Siamese network on very imbalanced data (the coil paper's §3.3).

The paper's epoch: about N_NOK² NOK–NOK pairs (each NOK with the others, repetitions allowed), as many
OK–OK pairs drawn from the far more numerous OK coils, and OK–NOK pairs in which each NOK meets many
different OK coils, so that matching and non-matching pairs balance (NOK–NOK : OK–OK : OK–NOK = 1 : 1 : 2).

:func:`pair_batches` produces exactly that mix without encoding a coil once per pair: each step takes a
batch of coils, half NOK and half OK, and *every* pair within the batch is a training pair. A batch with
h NOK and h OK coils holds h(h−1)/2 NOK–NOK, h(h−1)/2 OK–OK and h² OK–NOK pairs — the paper's
proportions — for 2h encoder passes instead of h(2h−1). NOK coils are cycled so that all of them take
part evenly; OK coils are drawn without replacement across the epoch. :func:`pair_type_weights` restores
the 1 : 1 : 2 balance when a class has too few coils to fill half a batch.

:func:`balanced_pairs` lists the same mix as explicit index pairs (used for a fixed validation set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SHARE = {"nok_nok": 1.0, "ok_ok": 1.0, "ok_nok": 2.0}  # the paper's pair mix, by type


@dataclass
class Pairs:
    left: np.ndarray  # indices into the coils
    right: np.ndarray
    same: np.ndarray  # 1 = both coils of the same class (a match), 0 = OK–NOK

    def __len__(self) -> int:
        return len(self.left)


def pair_batches(
    y: np.ndarray, batch_size: int, rng: np.random.Generator, max_pairs: int | None = None
) -> list[np.ndarray]:
    """One epoch of coil batches (indices into ``y``, 1 = NOK), each about half NOK and half OK.

    As many steps as it takes for about N_NOK² NOK–NOK pairs, and at least one; ``max_pairs`` caps the
    pairs per epoch (all pairs within every batch), which the N_NOK² growth would otherwise drive up.
    """
    y = np.asarray(y)
    nok, ok = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(nok) == 0 or len(ok) == 0:
        raise ValueError(f"pairs need both classes; got {len(ok)} OK and {len(nok)} NOK coils")
    if batch_size < 2:
        raise ValueError("a pair batch needs at least two coils")
    h_nok = max(1, min(batch_size // 2, len(nok)))
    h_ok = min(batch_size - h_nok, len(ok))
    nok_pairs_per_step = max(h_nok * (h_nok - 1) // 2, 1)
    steps = math.ceil(len(nok) ** 2 / nok_pairs_per_step)
    if max_pairs is not None:
        n = h_nok + h_ok
        steps = min(steps, max(1, max_pairs // (n * (n - 1) // 2)))
    nok_stream = _stream(nok, steps * h_nok, rng)
    ok_stream = _stream(ok, steps * h_ok, rng)
    return [
        rng.permutation(np.concatenate([nok_stream[i * h_nok : (i + 1) * h_nok], ok_stream[i * h_ok : (i + 1) * h_ok]]))
        for i in range(steps)
    ]


def _stream(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from ``idx``: whole shuffled passes, so every coil is used before any is used again."""
    return np.concatenate([rng.permutation(idx) for _ in range(-(-n // len(idx)))])[:n]


def all_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every unordered pair (i < j) of a batch: left, right and same-class (float) targets."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    return i, j, (labels[i] == labels[j]).float()


def pair_type_weights(labels_left: torch.Tensor, labels_right: torch.Tensor) -> torch.Tensor:
    """Per-pair weights (mean 1) that give NOK–NOK, OK–OK and OK–NOK pairs the 1 : 1 : 2 shares of the
    loss whatever their counts in the batch; a type that is absent leaves its share to the others."""
    kinds = labels_left.long() + labels_right.long()  # 0 = OK–OK, 1 = OK–NOK, 2 = NOK–NOK
    share = torch.tensor([SHARE["ok_ok"], SHARE["ok_nok"], SHARE["nok_nok"]], device=kinds.device)
    counts = torch.bincount(kinds, minlength=3).float()
    present = counts > 0
    per_pair = torch.where(present, share / counts.clamp(min=1), torch.zeros_like(share))
    weights = per_pair[kinds]
    return weights * (len(kinds) / weights.sum())


def balanced_pairs(y: np.ndarray, rng: np.random.Generator, max_pairs: int | None = None) -> Pairs:
    """Explicit pairs over labels ``y`` in the paper's mix, shuffled: about N_NOK² NOK–NOK, as many
    OK–OK, and twice as many OK–NOK with every NOK against many different OK coils; at most ``max_pairs``."""
    y = np.asarray(y)
    nok, ok = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(nok) == 0 or len(ok) == 0:
        raise ValueError(f"pairs need both classes; got {len(ok)} OK and {len(nok)} NOK coils")
    n_same = len(nok) ** 2
    if max_pairs is not None:
        n_same = max(1, min(n_same, max_pairs // 4))
    nn_left, nn_right = _within(nok, n_same, rng)
    oo_left, oo_right = _within(ok, n_same, rng)
    n_diff = 2 * n_same
    on_nok = _stream(nok, n_diff, rng)
    on_ok = _stream(ok, n_diff, rng)
    swap = rng.random(n_diff) < 0.5  # either coil on either side
    on_left, on_right = np.where(swap, on_ok, on_nok), np.where(swap, on_nok, on_ok)
    left = np.concatenate([nn_left, oo_left, on_left])
    right = np.concatenate([nn_right, oo_right, on_right])
    same = np.concatenate([np.ones(2 * n_same, dtype=np.int64), np.zeros(n_diff, dtype=np.int64)])
    order = rng.permutation(len(left))
    return Pairs(left[order], right[order], same[order])


def _within(idx: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of two coils from ``idx``, two different coils whenever the class has more than one."""
    a = rng.integers(0, len(idx), size=n)
    b = (a + rng.integers(1, len(idx), size=n)) % len(idx) if len(idx) > 1 else a
    return idx[a], idx[b]
