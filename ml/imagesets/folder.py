"""Image sets from a folder tree: one subfolder per class, grayscale images, optional same-name masks.

This is the layout of most public defect sets (the magnetic-tile set among them) and the easiest one
for a plant to produce by hand, so every image assessor can train on it without a bespoke loader.
A ``.png`` whose stem matches an image of another format (``crack_1.jpg`` + ``crack_1.png``) is that
image's mask, defect where the mask is above 127.

Also here: the two small image operations the loaders and the image assessors share (resizing an image
or a mask, and turning a coil dataset into an image set), kept in one place so they agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml.images import gray_array, to_gray
from ml.imagesets.base import OK_CLASSES, ImageSet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = ".png"
MASK_LEVEL = 127  # a mask pixel above this is defect

Size = int | tuple[int, int] | None  # side of a square, or (height, width); None keeps the size


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size: int | tuple[int, int], clip: bool = True) -> np.ndarray:
    """(H, W) float in [0, 1] → ``size`` with bilinear interpolation, float32 (a no-op at the same size);
    ``clip=False`` for images already standardized, whose values leave [0, 1]."""
    h, w = _hw(size)
    if image.shape == (h, w):
        return np.asarray(image, dtype=np.float32)
    pil = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F")
    out = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return out.clip(0, 1) if clip else out


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) bool → ``size`` bool; area-weighted, so a thin crack shrinks to a thin line rather than vanishing."""
    h, w = _hw(size)
    if mask.shape == (h, w):
        return np.asarray(mask, dtype=bool)
    pil = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((w, h), Image.Resampling.BOX)) >= 0.25


def read_gray(path: Path) -> np.ndarray:
    """An image file as (H, W) float32 in [0, 1] (colour images are converted to luminance)."""
    with Image.open(path) as im:
        return gray_array(to_gray(im))  # a 16-bit grey file scaled, not clamped white


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > MASK_LEVEL


def _images_in(folder: Path) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) pairs of one class folder, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems_non_png = {p.stem for p in files if p.suffix.lower() != MASK_SUFFIX}
    pairs = []
    for p in files:
        if p.suffix.lower() == MASK_SUFFIX and p.stem in stems_non_png:
            continue  # the mask of another image
        mask = p.with_suffix(MASK_SUFFIX) if p.suffix.lower() != MASK_SUFFIX else None
        pairs.append((p, mask if mask is not None and mask.is_file() else None))
    return pairs


def load_folder(
    root: str | Path,
    size: Size = None,
    classes: Sequence[str] | None = None,
    source: str | None = None,
) -> ImageSet:
    """Load ``root/<class>/<image>`` (+ optional ``<image stem>.png`` masks) as an :class:`ImageSet`.

    ``classes`` fixes which subfolders are read and in what order (the label index); by default every
    subfolder, sorted. ``size`` resizes every image (and mask) to a square side or (height, width).
    Masks are kept when every defect image has one; images of a defect-free class without one get an
    empty mask. Otherwise ``masks`` is None: a half-masked set would teach a segmenter that unmarked
    defects are background.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    names = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root} has no class subfolders")
    images: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    labels: list[int] = []
    files: list[str] = []
    digest = hashlib.sha256()
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"class folder {folder} is missing")
        for image_path, mask_path in _images_in(folder):
            image = read_gray(image_path)
            mask = read_mask(mask_path) if mask_path is not None else None
            if mask is not None and mask.shape != image.shape:
                raise ValueError(f"mask {mask_path} is {mask.shape}, its image {image.shape}")
            if size is not None:
                image = resize_image(image, size)
                mask = resize_mask(mask, size) if mask is not None else None
            images.append(image)
            masks.append(mask)
            labels.append(label)
            files.append(f"{name}/{image_path.name}")
            digest.update(files[-1].encode())
            digest.update(image.tobytes())
            digest.update(_mask_bytes(mask))  # the segmenter learns from the masks: re-annotated is other data
    ok = [n.lower() in OK_CLASSES for n in names]
    complete = all(m is not None or ok[lab] for m, lab in zip(masks, labels, strict=True))
    has_any = any(m is not None for m in masks)
    final_masks = None
    if complete and has_any:
        final_masks = [m if m is not None else np.zeros(im.shape, bool) for m, im in zip(masks, images, strict=True)]
    meta: dict[str, Any] = {
        "source": source or f"folder:{root.name}",
        "root": str(root),
        "size": list(_hw(size)) if size is not None else None,
        "counts": {n: labels.count(i) for i, n in enumerate(names)},
        "masks": final_masks is not None,
        "sha256": digest.hexdigest(),
    }
    return ImageSet(images, np.asarray(labels, dtype=np.int64), names, final_masks, files, meta)


def as_image_set(dataset: Any, size: int = 128) -> ImageSet:
    """An :class:`ImageSet` as it is, or a coil dataset rendered as images (``ImageSet.from_coils``)."""
    if isinstance(dataset, ImageSet):
        return dataset
    if hasattr(dataset, "X") and hasattr(dataset, "y"):
        return ImageSet.from_coils(dataset, size=size)
    raise TypeError(f"expected an ImageSet or a CoilDataset, got {type(dataset).__name__}")


def _mask_bytes(mask: np.ndarray | None) -> bytes:
    return b"no mask" if mask is None else b"mask" + np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes()


def content_digest(images: ImageSet) -> str:
    """SHA-256 of exactly these images: names, pixels, class and mask of each, in order. A subset (a few-shot draw,
    a validation split) has its own, where the folder's ``meta["sha256"]`` is the whole folder's."""
    digest = hashlib.sha256()
    masks = images.masks if images.masks is not None else [None] * len(images)
    for name, image, label, mask in zip(images.names, images.images, images.labels, masks, strict=True):
        digest.update(str(name).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(f"class {images.classes[int(label)]}".encode())
        digest.update(_mask_bytes(mask))
    return digest.hexdigest()


def image_set_summary(images: ImageSet) -> dict[str, Any]:
    """What a model manifest records about the image data it was trained on."""
    nok = images.nok
    counts = {c: int(np.sum(images.labels == i)) for i, c in enumerate(images.classes)}
    return {
        "n_images": len(images),
        "n_nok": int(nok.sum()),
        "nok_share": round(float(nok.mean()), 5) if len(images) else 0.0,
        "classes": counts,
        "masks": images.masks is not None,
        "source": images.meta.get("source"),
        "sha256": images.meta.get("sha256") if images.meta.get("source") != "coils" else None,
        "subset_of": images.meta.get("subset_of"),
        "content_sha256": content_digest(images),
    }
