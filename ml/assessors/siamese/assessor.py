"""``siamese``: the coil paper's contrastive model (§3.3, §4.4) — a Siamese CNN trained on balanced pairs
with binary cross-entropy on the pair similarity, classifying a coil by its mean similarity to three
K-means reference coils of each class.

Training: each epoch about N_NOK² NOK–NOK pairs, as many OK–OK pairs and twice as many OK–NOK pairs,
each NOK against many OK coils (capped at ``max_pairs`` per epoch), formed as all pairs within batches
of ``batch_size`` coils that are half NOK and half OK (``ml.training.pairs``), augmented as the
classifiers are; Adam; early stopping on the validation pair loss. Then the encoder embeds the training coils, K-means
finds ``references`` clusters per class, and the coil nearest each centroid becomes a reference. A coil's
raw p(NOK) is (1 + s_NOK − s_OK) / 2, with s_c its mean similarity to class c's references; the shared
calibration then moves the best validation threshold to 0.5.

The pair sampling balances the classes, so ``class_weight_nok`` and ``oversample_nok`` of the common
settings have no effect here. The reference embeddings are saved with the weights (``references.pt``);
warm start (ReTrain) copies the champion's network and normalization and chooses new references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ml.assessors.base import AssessBatch, Assessor, FitCallback, FitReport, Stopwatch
from ml.assessors.matrix_fit import MatrixSettings, calibrate_on_validation, start_matrix_fit
from ml.assessors.siamese.torch_model import SiameseNet
from ml.assessors.siamese.train import (
    PairLoopConfig,
    References,
    choose_references,
    embed,
    score,
    train_pairs,
)
from ml.dataset import CoilDataset
from ml.training.runtime import fit_runtime, resolve_device, seed_everything

WEIGHTS = "weights.pt"
REFERENCES = "references.pt"


class SiameseSettings(MatrixSettings):
    ignored: ClassVar[dict[str, str]] = {"oversample_nok": "its pair sampling balances the classes"}

    depth: int = Field(4, ge=1, le=12, description="convolutions of the encoder (the paper's best: 4 to 10)")
    width: int = Field(8, ge=2, le=128, description="channels of the first convolution, doubled at each one")
    embedding_dim: int = Field(32, ge=2, le=512)
    dropout: float = Field(0.3, ge=0, lt=1, description="before the dense layers (paper: 0.3–0.5 best)")
    pooling: Literal["avg", "max", "avgmax"] = Field(
        "avgmax", description="global pooling into the embedding: average (the paper's), max, or both side by side"
    )
    similarity: Literal["absdiff", "cosine", "distance"] = Field(
        "cosine", description="pair head: learned weights on |a − b| (Koch), scaled cosine, or scaled distance"
    )
    references: int = Field(3, ge=1, le=16, description="K-means reference coils per class")
    max_pairs: int = Field(65536, ge=1, description="pairs per epoch at most (the N_NOK² growth is capped)")


class SiameseAssessor(Assessor):
    key = "siamese"
    Settings = SiameseSettings
    weight_files = (WEIGHTS, REFERENCES)
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 5}

    def __init__(self, settings=None, *, name: str | None = None) -> None:
        super().__init__(settings, name=name)
        self.net: SiameseNet | None = None
        self.references: References | None = None

    def build_network(self) -> SiameseNet:
        s: SiameseSettings = self.settings  # type: ignore[assignment]
        return SiameseNet(
            similarity=s.similarity,
            depth=s.depth,
            width=s.width,
            embedding_dim=s.embedding_dim,
            dropout=s.dropout,
            pooling=s.pooling,
        )

    def fit(
        self,
        dataset: CoilDataset,
        init: Assessor | None = None,
        device: str = "auto",
        callback: FitCallback | None = None,
    ) -> FitReport:
        clock = Stopwatch()
        s: SiameseSettings = self.settings  # type: ignore[assignment]
        rng = seed_everything(s.seed)
        torch_device = resolve_device(device)
        data = start_matrix_fit(self, dataset, init, s.val_fraction, rng)
        x, y, train_idx, val_idx = data.x, data.y, data.train, data.val
        if y[train_idx].sum() == 0 or (y[train_idx] == 0).sum() == 0:
            raise ValueError(f"the {self.key} assessor needs OK and NOK coils to train on, got {dataset.n_nok} NOK")
        result = train_pairs(
            data.net,
            x[train_idx],
            y[train_idx],
            x[val_idx],
            y[val_idx],
            config=PairLoopConfig(
                epochs=s.epochs,
                batch_size=s.batch_size,
                lr=s.lr,
                patience=s.patience,
                max_pairs=s.max_pairs,
                references=s.references,
                seed=s.seed,
                label=self.name,
            ),
            device=torch_device,
            augment=data.augment,
            callback=callback,
        )
        self.net = data.net.cpu().eval()
        cpu = torch.device("cpu")
        self.references = choose_references(embed(self.net, x[train_idx], cpu), y[train_idx], s.references, s.seed)
        val_scores = score(self.net, embed(self.net, x[val_idx], cpu), self.references)
        calibrate_on_validation(self, dataset, data, val_scores)
        self.runtime = fit_runtime(
            torch_device,
            clock.seconds,
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            history=result.history,
            start="init" if init is not None else "scratch",
            references={
                "OK": [str(dataset.coil_id[train_idx[i]]) for i in self.references.ok_index],
                "NOK": [str(dataset.coil_id[train_idx[i]]) for i in self.references.nok_index],
            },
        )
        return FitReport(self.metrics, result.epochs_run, clock.seconds, str(torch_device))

    def predict_raw(self, batch: AssessBatch) -> np.ndarray:
        if self.net is None or self.references is None:
            raise RuntimeError(f"{self.key} assessor has not been fitted or loaded")
        cpu = torch.device("cpu")
        return score(self.net, embed(self.net, self.normalize(batch.matrices), cpu), self.references)

    def save_weights(self, directory: Path) -> None:
        if self.net is None or self.references is None:
            raise RuntimeError("nothing to save: the assessor has not been fitted")
        torch.save(self.net.state_dict(), directory / WEIGHTS)
        torch.save({"ok": self.references.ok, "nok": self.references.nok}, directory / REFERENCES)

    def load_weights(self, directory: Path) -> None:
        net = self.build_network()
        net.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
        refs = torch.load(directory / REFERENCES, map_location="cpu", weights_only=True)
        empty = np.zeros(0, dtype=np.int64)  # which training coils they were is in the manifest's runtime
        self.references = References(refs["ok"], refs["nok"], empty, empty)
        self.net = net.eval()
