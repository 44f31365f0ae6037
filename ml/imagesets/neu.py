"""The NEU surface defect database (NEU-DET): hot-rolled steel strip, six defect classes, 200 × 200 gray.

Files are ``images/{class}_{n}.jpg``. Every class is a defect, so the set serves the multi-class
(defect type) models and their few-shot benchmark, not the OK/NOK vote. :func:`few_shot_split` is
the self-contrastive paper's protocol: ``shots`` random training images per class, test on the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ml.imagesets.base import ImageSet

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
_NAME = re.compile(r"^(?P<cls>.+)_(?P<n>\d+)$")


def load_neu(root: str | Path, size: int | None = None) -> ImageSet:
    """Every image under ``root`` (the ``neu-det`` folder or its ``images`` folder), sorted by class and number.

    ``size`` resizes to ``size`` × ``size`` on load (bilinear), which saves memory and time when a model
    works at a smaller size anyway; None keeps 200 × 200.
    """
    root = Path(root)
    folder = root / "images" if (root / "images").is_dir() else root
    found: list[tuple[int, int, Path]] = []
    for path in folder.glob("*.jpg"):
        match = _NAME.match(path.stem)
        if match is None or match["cls"] not in NEU_CLASSES:
            continue
        found.append((NEU_CLASSES.index(match["cls"]), int(match["n"]), path))
    if not found:
        raise FileNotFoundError(f"no NEU images ({{class}}_{{n}}.jpg) in {folder}")
    found.sort()
    images = [_read_gray(path, size) for _, _, path in found]
    return ImageSet(
        images,
        np.array([c for c, _, _ in found], dtype=np.int64),
        list(NEU_CLASSES),
        names=[path.name for _, _, path in found],
        meta={"source": "neu-det", "root": str(folder), "size": size},
    )


def few_shot_split(imageset: ImageSet, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` training images drawn at random from each class, and every other image for testing.

    Raises when a class has no image left to test on, since its accuracy would then be undefined.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    for c in range(len(imageset.classes)):
        members = np.flatnonzero(imageset.labels == c)
        if len(members) == 0:
            continue
        if len(members) <= shots:
            raise ValueError(f"class {imageset.classes[c]!r} has {len(members)} images, not more than {shots} shots")
        train.append(rng.choice(members, size=shots, replace=False))
    train_idx = np.sort(np.concatenate(train))
    test_idx = np.setdiff1d(np.arange(len(imageset)), train_idx)
    return train_idx, test_idx


def _read_gray(path: Path, size: int | None) -> np.ndarray:
    with Image.open(path) as img:
        gray = img.convert("L")
        if size is not None and gray.size != (size, size):
            gray = gray.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(gray, dtype=np.float32) / 255.0
