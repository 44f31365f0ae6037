"""What every torch assessor that maps one coil to one NOK logit shares: fitting with the common loop,
calibration, validation metrics, and saving/loading a state dict. A model family supplies the
network (``build_network``) and how a normalized batch becomes its input (``to_input``)."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.assessors.base import AssessBatch, Assessor, FitCallback, FitReport, Stopwatch
from ml.assessors.matrix_fit import calibrate_on_validation, start_matrix_fit
from ml.dataset import CoilDataset
from ml.training.loop import LoopConfig, predict_logits, train_binary
from ml.training.runtime import channels_last_net, fit_runtime, resolve_device, seed_everything

WEIGHTS = "weights.pt"


class TorchClassifierAssessor(Assessor):
    weight_files = (WEIGHTS,)

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        self.net: nn.Module | None = None

    @abstractmethod
    def build_network(self) -> nn.Module:
        """A fresh, untrained network producing one logit per coil."""

    def to_input(self, x: np.ndarray) -> torch.Tensor:
        """Normalized (B, 264, 18) → (B, 1, 264, 18)."""
        return torch.from_numpy(np.ascontiguousarray(x[:, None]))

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter] | None:
        """Which parameters the optimizer updates (None: all that require grad). Freezing hooks in here."""
        return None

    def fit(
        self,
        dataset: CoilDataset,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        clock = Stopwatch()
        settings = self.settings
        rng = seed_everything(settings.seed)
        torch_device = resolve_device(device)
        data = start_matrix_fit(self, dataset, init, settings.val_fraction, rng)
        x, y, train_idx, val_idx = data.x, data.y, data.train, data.val
        result = train_binary(
            data.net,
            x[train_idx],
            y[train_idx],
            x[val_idx],
            y[val_idx],
            config=LoopConfig(
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                lr=settings.lr,
                patience=settings.patience,
                class_weight_nok=settings.class_weight_nok,
                oversample_nok=settings.oversample_nok,
                seed=settings.seed,
                label=self.name,
            ),
            to_input=self.to_input,
            device=torch_device,
            augment=data.augment,
            parameters=self.trainable_parameters(data.net),
            callback=callback,
        )
        self.net = data.net.cpu().eval()
        calibrate_on_validation(self, dataset, data, result.val_scores)
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            history=result.history,
        )
        return FitReport(self.metrics, result.epochs_run, clock.seconds, str(torch_device))

    def predict_raw(self, batch: AssessBatch) -> np.ndarray:
        if self.net is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        logits = predict_logits(self.net, self.normalize(batch.matrices), self.to_input, torch.device("cpu"))
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def save_weights(self, directory: Path) -> None:
        if self.net is None:
            raise RuntimeError("nothing to save: the assessor has not been fitted")
        torch.save(self.net.state_dict(), directory / WEIGHTS)

    def load_weights(self, directory: Path) -> None:
        net = self.build_network()
        net.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
        self.net = channels_last_net(net).eval()  # the layout it was trained and checked in
