"""The supervised training loop shared by the binary coil classifiers (CNN, YOLO, EfficientNet).

What the coil paper prescribes and every classifier needs: class-weighted loss (NOK:OK 5:1),
minority oversampling, augmentation, Adam, at most N epochs with early stopping on the validation
loss (patience 5), the best epoch's weights restored. Each model family only says how a batch of
normalized matrices becomes logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.evaluation.metrics import best_threshold, f1_nok
from ml.training.runtime import channels_last, channels_last_net

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
ToInput = Callable[[np.ndarray], torch.Tensor]
"""Normalized (B, 264, 18) float32 → the network's input tensor (on the CPU)."""


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    patience: int
    class_weight_nok: float
    oversample_nok: float
    seed: int
    weight_decay: float = 0.0
    label: str = "model"


@dataclass
class LoopResult:
    epochs_run: int
    best_epoch: int
    val_scores: np.ndarray  # sigmoid outputs of the best weights on the validation split
    history: list[dict[str, float]] = field(default_factory=list)


class EarlyStopping:
    """Keeps the weights of the epoch with the lowest validation loss, and says when ``patience`` epochs in a
    row brought no gain. Shared by every training loop so that "best epoch" means the same thing everywhere;
    a loop that maximizes a score passes its negative. The best weights are kept on the CPU, so a GPU run
    does not hold two copies of the network in device memory."""

    def __init__(self, net: nn.Module, patience: int, min_delta: float = 1e-5) -> None:
        self.net = net
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = 0
        self._stale = 0
        self._best_state = _cpu_copy(net)

    def should_stop(self, epoch: int, val_loss: float) -> bool:
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self._stale = val_loss, epoch, 0
            self._best_state = _cpu_copy(self.net)
            return False
        self._stale += 1
        return self._stale >= self.patience

    def restore_best(self) -> None:
        self.net.load_state_dict(self._best_state)


def weight_average(net: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``net``'s weights and batch-norm statistics (``decay`` per step),
    or None when ``decay`` is 0. Choosing the best epoch on a few validation images picks up their noise
    along with the weights; the average, which spans about 1 / (1 - decay) steps, moves less from one
    epoch to the next, so the epoch chosen matters less. The caller updates it after each step."""
    if not decay:
        return None
    ema = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    averaged = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=ema, use_buffers=True)
    averaged.update_parameters(net)  # the average starts at the starting weights, not at the first step's
    return averaged


def _cpu_copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def epoch_indices(y: np.ndarray, oversample_nok: float, rng: np.random.Generator) -> np.ndarray:
    """All OK coils once and every NOK coil ``oversample_nok`` times (fractional part drawn at random)."""
    ok = np.flatnonzero(y == 0)
    nok = np.flatnonzero(y == 1)
    whole = int(oversample_nok)
    extra = rng.choice(nok, size=round((oversample_nok - whole) * len(nok)), replace=False) if len(nok) else nok
    idx = np.concatenate([ok, *([nok] * whole), extra])
    return rng.permutation(idx)


def predict_logits(
    net: nn.Module, x: np.ndarray, to_input: ToInput, device: torch.device, batch: int = 256
) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            out.append(net(channels_last(to_input(x[start : start + batch])).to(device)).float().reshape(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def train_binary(
    net: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    config: LoopConfig,
    to_input: ToInput,
    device: torch.device,
    augment: Augment | None = None,
    parameters: list[nn.Parameter] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Train ``net`` (one logit per coil) and leave it holding the weights of its best validation epoch."""
    rng = np.random.default_rng(config.seed)
    channels_last_net(net).to(device)
    trainable = parameters if parameters is not None else [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    pos_weight = torch.tensor([config.class_weight_nok], device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    val_loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight.cpu())
    y_val_t = torch.as_tensor(y_val, dtype=torch.float32)

    stopping = EarlyStopping(net, config.patience)
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        idx = epoch_indices(y_train, config.oversample_nok, rng)
        total, seen = 0.0, 0
        for start in range(0, len(idx), config.batch_size):
            batch_idx = idx[start : start + config.batch_size]
            if len(batch_idx) < 2:  # batch norm needs two samples
                continue
            xb = x_train[batch_idx]
            if augment is not None:
                xb = augment(xb, rng)
            inputs = channels_last(to_input(xb)).to(device)
            targets = torch.as_tensor(y_train[batch_idx], dtype=torch.float32, device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(inputs).reshape(-1).float(), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch_idx)
            seen += len(batch_idx)
        logits = predict_logits(net, x_val, to_input, device)
        val_loss = float(val_loss_fn(torch.as_tensor(logits), y_val_t)) if len(logits) else 0.0
        scores = 1 / (1 + np.exp(-logits))
        threshold = best_threshold(y_val, scores)
        row = {
            "epoch": epoch,
            "train_loss": total / max(seen, 1),
            "val_loss": val_loss,
            "val_f1": f1_nok(y_val, scores >= threshold),
        }
        history.append(row)
        if callback is not None:
            callback({"assessor": config.label, "epochs": config.epochs, **row})
        if stopping.should_stop(epoch, val_loss):
            break
    stopping.restore_best()
    logits = predict_logits(net, x_val, to_input, device)
    return LoopResult(
        epochs_run=epoch, best_epoch=stopping.best_epoch, val_scores=1 / (1 + np.exp(-logits)), history=history
    )
