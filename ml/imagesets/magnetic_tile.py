"""The magnetic-tile surface defect set (Huang, Qiu and Yuan, The Visual Computer 2020).

One folder per class, ``MT_Free`` defect-free and five defect classes; each ``name.jpg`` (grayscale,
sizes vary) has a ``name.png`` mask, defect above 127. It is the set with pixel masks, so it serves
the segmenter (``contrastive_seg``) and the pixel-level evaluation of the anomaly model (``ssim_ae``).
"""

from __future__ import annotations

from pathlib import Path

from ml.imagesets.base import ImageSet
from ml.imagesets.folder import Size, load_folder

FREE = "MT_Free"
DEFECTS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
CLASSES = (FREE, *DEFECTS)  # label 0 is defect-free; "mt_free" is one of ImageSet's OK classes


def load_magnetic_tile(root: str | Path, size: Size = None, classes: tuple[str, ...] = CLASSES) -> ImageSet:
    """Load the set (or the ``classes`` named) with masks; ``size`` resizes images and masks alike.

    Images keep their own sizes by default; the assessors resize to their input size themselves, and
    segmentation metrics are fairest on the original pixels.
    """
    root = Path(root)
    unknown = set(classes) - set(CLASSES)
    if unknown:
        raise ValueError(f"not magnetic-tile classes: {sorted(unknown)}")
    images = load_folder(root, size=size, classes=classes, source="magnetic-tile")
    if images.masks is None:
        raise ValueError(f"{root}: some defect images have no mask; the magnetic-tile set has one per image")
    return images
