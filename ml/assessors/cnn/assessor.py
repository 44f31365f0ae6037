"""``cnn``: the coil paper's baseline CNN, trained with class weights NOK:OK 5:1."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from torch import nn

from ml.assessors.cnn.torch_model import CoilCNN
from ml.assessors.matrix_fit import MatrixSettings
from ml.assessors.torch_classifier import TorchClassifierAssessor


class CnnSettings(MatrixSettings):
    depth: int = Field(4, ge=1, le=12, description="convolutions; the paper's best was 10")
    width: int = Field(8, ge=2, le=128, description="channels of the first convolution, doubled at each pooling")
    dropout: float = Field(0.3, ge=0, lt=1)


class CnnAssessor(TorchClassifierAssessor):
    key = "cnn"
    Settings = CnnSettings
    quick_settings: ClassVar[dict[str, Any]] = {"epochs": 3}

    def build_network(self) -> nn.Module:
        s: CnnSettings = self.settings  # type: ignore[assignment]
        return CoilCNN(depth=s.depth, width=s.width, dropout=s.dropout)
