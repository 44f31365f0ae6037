"""The segmentation network of the contrastive defect-segmentation paper, as a plain torch module.

An encoder, a decoder of transposed convolutions with concatenated skip connections and residual blocks
with squeeze-and-excitation, and a 1 × 1 segmentation head giving one logit per pixel. The projection
head maps the last decoder features to unit-length embeddings for the contrastive loss; it is used only
in training and costs nothing at inference. SE lets a block weight its channels by the whole image's
context, which helps with low-contrast defects such as the "uneven" tiles.

Two encoders share that decoder: the paper's, residual SE blocks with max pooling (channels w, 2w, 4w,
8w, then a 16w bottleneck; the paper's w = 32), trained from scratch; and EfficientNet-Lite0's stem and
MBConv stages with their ImageNet weights (the file ``effnet`` already uses), which brings edge and
texture filters learned on a million images to a defect set of a hundred-odd.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ml.assessors.effnet.torch_model import EffNetLite0

Encoder = Literal["residual_se", "effnet_lite0"]
LITE_STRIDE = 32  # EfficientNet-Lite0's deepest features are at 1/32 of the input


def size_multiple(encoder: Encoder, depth: int) -> int:
    """What an input side must be a multiple of, so every skip meets its upsampled partner exactly."""
    return 2**depth if encoder == "residual_se" else LITE_STRIDE


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class ResidualSEBlock(nn.Module):
    """Two 3 × 3 convolutions with batch norm, SE on the result, plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            SqueezeExcitation(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResidualSEEncoder(nn.Module):
    """The paper's encoder: a residual SE block then 2 × 2 max pooling per stage, and a bottleneck block.

    ``skip_channels`` (finest first) and ``bottom_channels`` tell the decoder what it gets;
    ``decoder_channels`` what each of its levels should give back (here: the skip's own width)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        channels = [width * 2**i for i in range(depth)]
        inputs = [1, *channels[:-1]]
        self.blocks = nn.ModuleList(ResidualSEBlock(c_in, c) for c_in, c in zip(inputs, channels, strict=True))
        self.bottleneck = ResidualSEBlock(channels[-1], 2 * channels[-1])
        self.skip_channels = channels
        self.decoder_channels = channels
        self.bottom_channels = 2 * channels[-1]
        self.multiple = size_multiple("residual_se", depth)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for block in self.blocks:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        return skips, self.bottleneck(x)


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights) as a U-Net encoder for gray images.

    The gray image goes in as three equal channels; the skips are the image itself (stride 1) and the
    ends of stages 0, 1, 2 and 4 (strides 2, 4, 8, 16: 16, 24, 40, 112 channels), the bottom the end of
    stage 6 (stride 32, 320 channels). The 1 × 1 head convolution and the classifier are not used. The
    stem and the first ``freeze`` stages keep their ImageNet weights and batch-norm statistics."""

    SKIP_STAGES = (0, 1, 2, 4)

    def __init__(self, width: int, image_size: int, freeze: int = 2, pretrained: bool = True):
        super().__init__()
        self.backbone = EffNetLite0(image_size, pretrained=pretrained)
        self.backbone.freeze(freeze)
        stages = self.backbone.stage_of_block
        blocks = self.backbone.net._blocks
        last_of_stage = [i + 1 == len(stages) or stages[i + 1] != s for i, s in enumerate(stages)]
        taps = [i for i, s in enumerate(stages) if s in self.SKIP_STAGES and last_of_stage[i]]
        self.taps = set(taps)
        self.skip_channels = [1, *(blocks[i]._block_args.output_filters for i in taps)]
        self.decoder_channels = [width, width, 2 * width, 4 * width, 8 * width]
        self.bottom_channels = blocks[-1]._block_args.output_filters
        self.multiple = LITE_STRIDE

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        net = self.backbone.net
        skips = [x]
        x = net._swish(net._bn0(net._conv_stem(x.expand(-1, 3, -1, -1))))
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self.taps:
                skips.append(x)
        return skips, x


class ContrastiveSegNet(nn.Module):
    """(B, 1, H, W), each image standardized, H and W multiples of ``encoder.multiple`` → (B, 1, H, W) logits."""

    def __init__(
        self,
        width: int = 32,
        depth: int = 4,
        proj_dim: int = 64,
        encoder: Encoder = "residual_se",
        image_size: int = 128,
        freeze: int = 2,
        pretrained: bool = False,
    ):
        super().__init__()
        self.encoder: ResidualSEEncoder | LiteEncoder = (
            ResidualSEEncoder(width, depth)
            if encoder == "residual_se"
            else LiteEncoder(width, image_size, freeze=freeze, pretrained=pretrained)
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        c_prev = self.encoder.bottom_channels
        for c_skip, c in reversed(list(zip(self.encoder.skip_channels, self.encoder.decoder_channels, strict=True))):
            self.up.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            self.decoder.append(ResidualSEBlock(c + c_skip, c))
            c_prev = c
        self.head = nn.Conv2d(c_prev, 1, 1)
        # start from p(defect) ≈ 0.05, the rare class's prior, not 0.5: otherwise the first hundreds of
        # steps only teach the network that most pixels are background
        nn.init.constant_(self.head.bias, -3.0)
        self.projection = nn.Sequential(
            nn.Conv2d(c_prev, c_prev, 1), nn.ReLU(inplace=True), nn.Conv2d(c_prev, proj_dim, 1)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder feature map, (B, width, H, W)."""
        multiple = self.encoder.multiple
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")
        skips, x = self.encoder(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and unit-length pixel embeddings (B, proj_dim, H, W) from the projection head."""
        f = self.features(x)
        return self.head(f), F.normalize(self.projection(f), dim=1)


class SeedMean(nn.Module):
    """Networks of one shape, trained from different seeds, as one: the mean of their p(defect), as a logit
    (the assessor takes the sigmoid of whatever its network returns)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(member(x)) for member in self.members]).mean(dim=0)
        return torch.logit(p, eps=1e-7)
