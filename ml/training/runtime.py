"""Seeds and devices: the same seed and data must give the same model, on the CPU at least."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


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


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the GPU when one is present, else the CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


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
    }
    if start is not None:
        runtime["start"] = start
    return {**runtime, **extra, "history": history}
