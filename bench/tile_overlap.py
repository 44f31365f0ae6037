"""How many magnetic-tile test images have a near-copy in the training split (bench/image_tile.py's split).

The set holds several photographs of the same physical tile (different ``expN`` runs, nearby numbers, the
same defect); a split image by image can put one shot in training and another in test, which flatters
the test figures. Each test image is compared with every training image of the same split at 24 × 24
pixels (zero-mean, unit-norm: a correlation), and for defect images the masks of the nearest pair are
compared too. Random test/train pairs give the baseline of what "similar" means on this set.

Then, for the grouped splits (``--split grouped --split-seed N`` of bench/image_tile.py), which test shots
carry the pooled figure: the share of the test defect pixels in ``MT_Uneven`` images and in wide shots
(more than 1.8 times as wide as tall, which a square resize squashes most).

    .venv/bin/python bench/tile_overlap.py
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import provenance
from bench.image_tile import DATASETS, split
from ml.imagesets.folder import resize_mask
from ml.imagesets.magnetic_tile import load_magnetic_tile
from ml.imagesets.near_copies import NEAR, THUMB_SIDE, thumbnails


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = resize_mask(a, 64).astype(bool), resize_mask(b, 64).astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


WIDE = 1.8  # width / height above which a shot counts as wide
GROUPED_SPLITS = (0, 1, 2)


def shot_shapes(tiles) -> list[str]:
    """A table row per grouped split: where its test defect pixels lie."""
    wide = np.array([im.shape[1] / im.shape[0] > WIDE for im in tiles.images])
    uneven = tiles.labels == tiles.classes.index("MT_Uneven")
    pixels = np.array([int(m.sum()) for m in tiles.masks])
    rows = []
    for seed in GROUPED_SPLITS:
        train, test = split(tiles, None, grouped=True, seed=seed)[:2]
        share = [pixels[test][k[test]].sum() / pixels[test].sum() for k in (uneven, wide, wide & uneven)]
        rows.append(
            f"| {seed} | {wide[train].sum()} / {wide[test].sum()} | {(wide & uneven)[train].sum()} / "
            f"{(wide & uneven)[test].sum()} | " + " | ".join(f"{v:.2f}" for v in share) + " |"
        )
    return rows


def main() -> None:
    tiles = load_magnetic_tile(DATASETS / "magnetic-tile")
    defect_train, defect_test, free_train, free_test = split(tiles, None)
    similarity = thumbnails(tiles.images, defect_test) @ thumbnails(tiles.images, defect_train).T
    nearest, partner = similarity.max(axis=1), defect_train[similarity.argmax(axis=1)]
    near = nearest > NEAR
    same_defect = np.array(
        [mask_iou(tiles.masks[i], tiles.masks[j]) > 0.5 for i, j in zip(defect_test, partner, strict=True)]
    )
    baseline = np.quantile(similarity.ravel(), [0.5, 0.99])
    free_nearest = (thumbnails(tiles.images, free_test) @ thumbnails(tiles.images, free_train).T).max(axis=1)
    by_class = collections.Counter(
        tiles.classes[tiles.labels[i]] for i, hit in zip(defect_test, near & same_defect, strict=True) if hit
    )
    print(f"## Near-copies across the magnetic-tile split (correlation > {NEAR} at {THUMB_SIDE} × {THUMB_SIDE} px)\n")
    print("| images | test | with a near-copy in training | … whose defect mask also overlaps (IoU > 0.5) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| defect | {len(defect_test)} | {near.sum()} | {(near & same_defect).sum()} |")
    print(f"| defect-free | {len(free_test)} | {(free_nearest > NEAR).sum()} | — |")
    print(
        f"\nAll test × training defect pairs: median correlation {baseline[0]:.2f}, 99th percentile "
        f"{baseline[1]:.3f}. Near-copies with the same defect, by class: "
        + ", ".join(f"{name} {n}" for name, n in sorted(by_class.items()))
        + "."
    )
    print(f"\n## Where the test defect pixels lie, grouped splits (wide: more than {WIDE} times as wide as tall)\n")
    print("| grouped split seed | wide defect shots train / test | wide `MT_Uneven` train / test "
          "| share of test defect pixels: `MT_Uneven` | wide | wide `MT_Uneven` |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(shot_shapes(tiles)))
    print(f"\n{provenance()}")


if __name__ == "__main__":
    main()
