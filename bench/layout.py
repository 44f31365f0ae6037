"""NCHW against NHWC (channels-last) memory layout for the coil networks on this machine's CPU.

Why the training loop and the loaded models use channels-last (``ml.training.runtime.channels_last``):
one training step (forward, backward) and one inference forward of batch 64, default network sizes,
mean of 10 after 2 warm-up steps, each network in both layouts.

    .venv/bin/python bench/layout.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.common import provenance, write_section
from ml.assessors.cnn.torch_model import CoilCNN
from ml.assessors.effnet.torch_model import EffNetLite0
from ml.assessors.siamese.torch_model import SiameseEncoder
from ml.assessors.yolo.torch_model import YoloClassifier
from ml.training.runtime import channels_last, channels_last_net

NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn (264 × 18)": (CoilCNN, (1, 264, 18)),
    "siamese encoder (264 × 18)": (SiameseEncoder, (1, 264, 18)),
    "yolo n (64 px)": (lambda: YoloClassifier("n", 1), (1, 64, 64)),
    "yolo s (64 px)": (lambda: YoloClassifier("s", 1), (1, 64, 64)),
    "effnet (64 px)": (lambda: EffNetLite0(64, dropout=0.2, pretrained=False), (3, 64, 64)),
}


def _mean_seconds(step: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def measure(make: Callable[[], nn.Module], shape: tuple[int, ...], nhwc: bool, batch: int, repeats: int):
    torch.manual_seed(0)
    net, x = make(), torch.randn(batch, *shape)
    if nhwc:
        net, x = channels_last_net(net), channels_last(x)
    net.train()
    train = _mean_seconds(lambda: net(x).float().sum().backward(), repeats)
    net.eval()
    with torch.inference_mode():
        infer = _mean_seconds(lambda: net(x), repeats)
    return train, infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    rows = []
    for name, (make, shape) in NETWORKS.items():
        (t0, i0), (t1, i1) = (measure(make, shape, nhwc, args.batch, args.repeats) for nhwc in (False, True))
        ms = " | ".join(f"{v * 1e3:.0f}" for v in (t0, t1))
        ms_infer = " | ".join(f"{v * 1e3:.0f}" for v in (i0, i1))
        rows.append(f"| {name} | {ms} | {t0 / t1:.2f}× | {ms_infer} | {i0 / i1:.2f}× |")
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| network | train step NCHW ms | NHWC ms | speed-up | inference NCHW ms | NHWC ms | speed-up |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    section = "\n\n".join(
        [
            "## Memory layout of the coil networks on the CPU",
            provenance(),
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, mean of "
            f"{args.repeats} steps after 2 warm-up steps, default network sizes, "
            "random weights (the layout, not the weights, sets the speed).",
            table,
        ]
    )
    if not args.no_write:
        write_section("layout", section)


if __name__ == "__main__":
    main()
