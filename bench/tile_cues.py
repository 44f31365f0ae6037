"""Magnetic-tile anomaly maps that learn nothing: the floor the ``ssim_ae`` figures should be read against.

The autoencoder's pixel ROC-AUC (docs/benchmarks.md, table (b)) means little without knowing what a plain
filter scores on the same pixels. Each map here is a fixed image operation at the tile's own resolution
(brightness, local contrast, horizontal gradient across the grinding streaks), smoothed at σ = 8 px, either
raw or as its distance from the image's own median (a defect is what differs from the rest of its tile).
Scored exactly as the autoencoder is: pixel ROC-AUC pooled over the test defect images (and per class),
image ROC-AUC of the map's maximum, test defect images against test defect-free ones; the same split.

    .venv/bin/python bench/tile_cues.py                    # image-by-image split seed 0, as table (b)
    .venv/bin/python bench/tile_cues.py --split grouped    # the shots of one tile kept together
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from bench.common import provenance
from bench.image_tile import DATASETS, SEED, by_class, split
from ml.imagesets.magnetic_tile import load_magnetic_tile

SMOOTH = 8.0  # px at the tile's own resolution: about σ = 3 at the autoencoder's 128 px


def local_contrast(x: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Gaussian-weighted local standard deviation: how strong the grinding streaks are around a pixel."""
    mean = ndimage.gaussian_filter(x, sigma)
    return np.sqrt(np.maximum(ndimage.gaussian_filter(x * x, sigma) - mean * mean, 0.0))


def streak_gradient(x: np.ndarray) -> np.ndarray:
    """Gradient across the (vertical) grinding streaks."""
    return np.abs(ndimage.sobel(x, axis=1))


def _smoothed(feature: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: ndimage.gaussian_filter(feature(x), SMOOTH)


def _from_median(feature: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def cue(x: np.ndarray) -> np.ndarray:
        f = feature(x)
        return np.abs(f - np.median(f))

    return cue


FEATURES = {"brightness": lambda x: x, "local contrast": local_contrast, "streak gradient": streak_gradient}
CUES = {
    f"{name}{suffix}": wrap(_smoothed(feature))
    for name, feature in FEATURES.items()
    for suffix, wrap in (("", lambda f: f), (", distance from the image median", _from_median))
}


def run(datasets: Path = DATASETS, grouped: bool = False, split_seed: int = SEED) -> str:
    tiles = load_magnetic_tile(datasets / "magnetic-tile")
    _, defect_test, _, free_test = split(tiles, None, grouped, split_seed)
    names = [tiles.classes[c] for c in np.unique(tiles.labels[defect_test])]
    truth = [tiles.masks[i].ravel() for i in defect_test]  # type: ignore[index]
    test = np.r_[free_test, defect_test]
    y = tiles.nok[test].astype(int)
    lines = [
        f"Split {'grouped' if grouped else 'image by image'}, seed {split_seed}: {len(defect_test)} test defect "
        f"images, {len(free_test)} test defect-free.",
        "",
        "| map (smoothed at σ = 8 px) | pixel ROC-AUC | image ROC-AUC (max) | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for name, cue in CUES.items():
        maps = {i: cue(tiles.images[i].astype(np.float32)) for i in test}
        pixels = [maps[i].ravel() for i in defect_test]

        def pixel_auc(k, pixels=pixels) -> float:  # k: positions into defect_test
            return roc_auc_score(np.concatenate([truth[j] for j in k]), np.concatenate([pixels[j] for j in k]))

        pooled = pixel_auc(range(len(defect_test)))
        image = roc_auc_score(y, [maps[i].max() for i in test])
        per_class = by_class(tiles, defect_test, pixel_auc).values()
        lines.append(f"| {name} | {pooled:.3f} | {image:.3f} | " + " | ".join(f"{a:.3f}" for a in per_class) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="the shared datasets folder")
    parser.add_argument("--split", choices=("images", "grouped"), default="images")
    parser.add_argument("--split-seed", type=int, default=SEED)
    args = parser.parse_args()
    print(run(args.datasets, args.split == "grouped", args.split_seed))
    print(f"\n{provenance()}")


if __name__ == "__main__":
    main()
