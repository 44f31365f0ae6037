"""Training the Siamese network on balanced pairs, and choosing its reference coils.

Each epoch draws fresh balanced batches (``ml.training.pairs.pair_batches``: half NOK, half OK, about
N_NOK² NOK–NOK pairs per epoch), augments every coil (``ml.training.augment``), encodes each coil of a
batch once, scores every pair within the batch, and minimizes the pair loss with Adam. Early stopping watches the
pair loss on a fixed set of validation pairs (patience epochs without improvement) and the best epoch's
weights are restored, as in the classifiers' loop. The epoch's validation NOK-F1 is measured the way
the model will be used, against K-means references from the training coils, for progress reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from ml.assessors.siamese.loss import pair_loss
from ml.assessors.siamese.torch_model import SiameseNet
from ml.evaluation.metrics import best_threshold, f1_nok
from ml.training.loop import Augment, EarlyStopping
from ml.training.pairs import Pairs, all_pairs, balanced_pairs, pair_batches, pair_type_weights


@dataclass
class PairLoopConfig:
    epochs: int
    batch_size: int  # coils per step; every pair within the batch is a training pair
    lr: float
    patience: int
    max_pairs: int  # pairs per epoch at most
    references: int  # per class
    seed: int
    label: str = "siamese"


@dataclass
class PairLoopResult:
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class References:
    """Embeddings of the reference coils of each class, and which training coils they are."""

    ok: torch.Tensor  # (k, D)
    nok: torch.Tensor  # (k, D)
    ok_index: np.ndarray
    nok_index: np.ndarray


def to_input(x: np.ndarray) -> torch.Tensor:
    """Normalized (B, 264, 18) → (B, 1, 264, 18)."""
    return torch.from_numpy(np.ascontiguousarray(x[:, None], dtype=np.float32))


def embed(net: SiameseNet, x: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Embeddings of normalized coils in eval mode, on the CPU."""
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            out.append(net.embed(to_input(x[start : start + batch]).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, net.embedding_dim)


def score(net: SiameseNet, embeddings: torch.Tensor, refs: References) -> np.ndarray:
    """Raw p(NOK) per coil from its mean similarity to the NOK and to the OK references:
    (1 + s_NOK − s_OK) / 2, so 0.5 means "as like the one class as the other"."""
    device = next(net.parameters()).device
    with torch.inference_mode():
        e = embeddings.to(device)[:, None, :]
        s_ok = torch.sigmoid(net.similarity_logit(e, refs.ok.to(device)[None])).mean(dim=1)
        s_nok = torch.sigmoid(net.similarity_logit(e, refs.nok.to(device)[None])).mean(dim=1)
    return ((1.0 + s_nok - s_ok) / 2.0).double().cpu().numpy()


def choose_references(embeddings: torch.Tensor, y: np.ndarray, k: int, seed: int) -> References:
    """K-means (k clusters) on each class's embeddings; each centroid is represented by the training coil
    nearest to it (the paper's "centroid images"), so a reference is always a real coil."""
    chosen: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    emb = embeddings.double().numpy()
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        if len(idx) == 0:
            raise ValueError("references need coils of both classes")
        n = min(k, len(idx))
        points = emb[idx]
        km = KMeans(n_clusters=n, n_init=10, random_state=seed % 2**32).fit(points)
        picked: list[int] = []
        for centre in km.cluster_centers_:
            distance = np.linalg.norm(points - centre, axis=1)
            distance[picked] = np.inf  # distinct coils even when two centroids share a nearest one
            picked.append(int(np.argmin(distance)))
        chosen[label] = (embeddings[idx[picked]].clone(), idx[picked])
    return References(chosen[0][0], chosen[1][0], chosen[0][1], chosen[1][1])


def train_pairs(
    net: SiameseNet,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    config: PairLoopConfig,
    device: torch.device,
    augment: Augment | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> PairLoopResult:
    """Train ``net`` on pairs and leave it holding the weights of its best validation epoch."""
    rng = np.random.default_rng(config.seed)
    net.to(device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr)
    val_pairs = _validation_pairs(y_val, config)
    stopping = EarlyStopping(net, config.patience)
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        total, seen = 0.0, 0
        for batch_idx in pair_batches(y_train, config.batch_size, rng, config.max_pairs):
            xb = x_train[batch_idx]
            if augment is not None:
                xb = augment(xb, rng)
            labels = torch.as_tensor(y_train[batch_idx], device=device)
            left, right, same = all_pairs(labels)
            optimizer.zero_grad(set_to_none=True)
            e = net.embed(to_input(xb).to(device))
            logits = net.similarity_logit(e[left], e[right])
            loss = pair_loss(logits, same, pair_type_weights(labels[left], labels[right]))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(same)
            seen += len(same)
        train_loss = total / max(seen, 1)
        val_loss = _pair_loss(net, x_val, val_pairs, device) if val_pairs else train_loss
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_f1": _reference_f1(net, x_train, y_train, x_val, y_val, config, device),
        }
        history.append(row)
        if callback is not None:
            callback({"assessor": config.label, "epochs": config.epochs, **row})
        if stopping.should_stop(epoch, val_loss):
            break
    stopping.restore_best()
    return PairLoopResult(epochs_run=epoch, best_epoch=stopping.best_epoch, history=history)


def _validation_pairs(y_val: np.ndarray, config: PairLoopConfig) -> Pairs | None:
    """The same validation pairs every epoch (their own seed), or None when the split lacks a class."""
    if np.all(y_val == 1) or np.all(y_val == 0):
        return None
    return balanced_pairs(y_val, np.random.default_rng(config.seed + 1), config.max_pairs // 4)


def _pair_loss(net: SiameseNet, x: np.ndarray, pairs: Pairs, device: torch.device) -> float:
    """The pair loss over fixed validation pairs, each coil encoded once (eval mode)."""
    e = embed(net, x, device)
    with torch.inference_mode():
        logits = net.similarity_logit(e[pairs.left].to(device), e[pairs.right].to(device))
        return pair_loss(logits, torch.as_tensor(pairs.same, device=device)).item()


def _reference_f1(
    net: SiameseNet,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    config: PairLoopConfig,
    device: torch.device,
) -> float:
    """Validation NOK-F1 at the best threshold, scoring against references chosen on the training coils."""
    if len(x_val) == 0 or y_val.sum() == 0:
        return 0.0
    refs = choose_references(embed(net, x_train, device), y_train, config.references, config.seed)
    scores = score(net, embed(net, x_val, device), refs)
    return f1_nok(y_val, scores >= best_threshold(y_val, scores))
