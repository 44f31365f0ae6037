"""Small synthetic coils and surface images for fast tests (the simulator is for realistic data; this is for speed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine

from ml.dataset import CoilDataset
from ml.imagesets.base import ImageSet
from services.db import migrate
from services.db.engine import make_engine
from services.db.repositories import SqlFeedbackStore, SqlModelRegistry, SqlRetrainRuns, SqlScoreStore
from workflows.retrain import ReTrain


def stripe_coils(n: int, nok_share: float = 0.1, seed: int = 0) -> CoilDataset:
    """OK coils are flat around 140 g/m²; a NOK coil has one sensor 30 g/m² thinner over 40 sections."""
    rng = np.random.default_rng(seed)
    X = rng.normal(140, 2, (n, 264, 18)).astype(np.float32)
    y = np.zeros(n, dtype=np.int8)
    y[rng.permutation(n)[: max(2, int(n * nok_share))]] = 1
    for i in np.flatnonzero(y):
        sensor, start = rng.integers(0, 18), rng.integers(0, 220)
        X[i, start : start + 40, sensor] -= 30
    X[rng.random(X.shape) < 0.005] = np.nan
    ids = [f"U{seed}-{i:05d}" for i in range(n)]
    return CoilDataset(X, y, ids, np.datetime64("2026-01-01T00:00") + np.arange(n).astype("timedelta64[m]"))


def synthetic_images(per_class: int = 8, seed: int = 0, classes: tuple[str, ...] = ("ok", "scratch", "spot")):
    """Flat noisy plates; a scratch is a dark line, a spot a bright disc. Sizes vary, as real images do."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, name in enumerate(classes):
        for _ in range(per_class):
            side = int(rng.integers(36, 48))
            img = np.clip(rng.normal(0.5, 0.05, (side, side)), 0, 1).astype(np.float32)
            if name == "scratch":
                row = int(rng.integers(5, side - 5))
                img[row : row + 2, :] = 0.1
            elif name == "spot":
                yy, xx = np.mgrid[:side, :side]
                cy, cx = rng.integers(10, side - 10, size=2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 0.95
            images.append(img)
            labels.append(c)
    return ImageSet(images, np.array(labels), list(classes), meta={"source": "synthetic"})


def synthetic_tiles(n_ok: int = 12, n_nok: int = 8, seed: int = 0) -> ImageSet:
    """Noisy gray tiles of varying size; a defect is a dark disc, marked in the mask."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for k in range(n_ok + n_nok):
        h, w = rng.integers(40, 64, 2)
        image = (0.55 + 0.05 * rng.standard_normal((h, w))).astype(np.float32)
        mask = np.zeros((h, w), bool)
        if k >= n_ok:
            r, c = rng.integers(10, h - 10), rng.integers(10, w - 10)
            yy, xx = np.ogrid[:h, :w]
            mask = (yy - r) ** 2 + (xx - c) ** 2 <= rng.integers(5, 9) ** 2
            image[mask] = 0.1
        images.append(image.clip(0, 1))
        masks.append(mask)
        labels.append(int(k >= n_ok))
    return ImageSet(images, np.array(labels), ["ok", "defect"], masks, meta={"source": "synthetic"})


def write_image_folder(images: ImageSet, root: Path) -> Path:
    """``images`` as the folder layout ``coilguard train --data`` reads: ``root/<class>/<n>.bmp`` (lossless, not
    PNG, so that the ``<n>.png`` beside it is its mask)."""
    for k, (image, label) in enumerate(zip(images.images, images.labels, strict=True)):
        folder = root / images.classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{k}.bmp")
        if images.masks is not None:
            Image.fromarray(images.masks[k].astype(np.uint8) * 255).save(folder / f"{k}.png")
    return root


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Change ``manifest.json`` in place as a hand or a foreign tool would: the raw JSON, not the Manifest API."""
    path = directory / "manifest.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content, indent=2))


def as_written_by_release_1(content: dict[str, Any]) -> None:
    """A manifest as releases before integrity version 2 wrote it: no ``integrity``, no ``artifact_sha256``."""
    content.pop("integrity", None)
    content.pop("artifact_sha256", None)


def legacy_sha256(files: dict[str, str]) -> str:
    """The registry checksum older releases recorded: weight file names and checksums only. Spelled out here,
    not imported, so that a change to the definition breaks this test instead of the plants' registry rows."""
    return hashlib.sha256("".join(f"{name}:{files[name]}\n" for name in sorted(files)).encode()).hexdigest()


def sql_retrain(engine: Any, registry: SqlModelRegistry, model_dir: Path, **options: Any) -> ReTrain:
    """ReTrain on the stores of ``engine`` (a test database), as the scheduler builds it."""
    return ReTrain(
        registry=registry,
        scores=SqlScoreStore(engine),
        feedback=SqlFeedbackStore(engine),
        runs=SqlRetrainRuns(engine),
        model_dir=model_dir,
        worker="test:1",
        **options,
    )


@contextmanager
def migrated_engine(url: str) -> Iterator[Engine]:
    """An engine on the database at ``url`` (a SQLite file), migrated to the newest revision first."""
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
