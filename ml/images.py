"""Surface images for the image assessors: bytes in, grayscale float32 in [0, 1] out."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, JpegImagePlugin

# What PIL refuses to open (its decompression-bomb limit): the size is then not known, only that it is over this.
OVER_PIL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485) + 1


# Grey images of more than 8 bits (machine-vision cameras' Mono16 PNGs): PIL's convert("L") clamps their values at
# 255 instead of scaling them, and a 16-bit frame came out almost white.
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_gray(image: Image.Image) -> Image.Image:
    """``image`` as one channel: 8-bit "L", or for 16-bit grey "F" scaled to [0, 1]."""
    if image.mode in WIDE_GRAY_MODES:
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0), mode="F")
    return image.convert("L")


def gray_array(gray: Image.Image) -> np.ndarray:
    """What :func:`to_gray` gave (perhaps resized) as (H, W) float32 in [0, 1]."""
    array = np.asarray(gray, dtype=np.float32)
    return array if gray.mode == "F" else array / 255.0


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG or JPEG bytes → (H, W) float32 in [0, 1]; raises ValueError on anything else.

    ``size`` (width, height): smaller than the file's, for images far larger than any assessor looks at (they
    resize to 512 px at most). A JPEG is decoded at the nearest larger scale its decoder offers (1/2, 1/4, 1/8)
    straight away, a multi-picture one (MPO, which PIL names apart but which is a JPEG) included; whatever is
    left is averaged down to ``size`` exactly."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                image.draft("L", size)
            gray = to_gray(image)
            if size is not None and gray.size != size:
                gray = gray.resize(size, Image.Resampling.BOX)
            return gray_array(gray)
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {exc}") from None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header alone, without decoding it: what an image would take in memory is
    known before any of it is spent; None for one PIL will not even open (over ``OVER_PIL_LIMIT`` pixels).
    Raises ValueError on anything PIL cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        return None
    except Exception:  # PIL's words name its BytesIO, which would mean nothing on the rejected topic
        raise ValueError("not a readable image: its header could not be read") from None


def fit_within(size: tuple[int, int], pixels: float) -> tuple[int, int]:
    """``size`` scaled down, aspect kept, to at most ``pixels`` in all (at least one pixel a side): a 1-pixel-wide
    strip is shortened, not left at its length because its width cannot shrink."""
    width, height = size
    if width * height <= pixels:
        return size
    scale = math.sqrt(pixels / (width * height))
    fit_w = max(1, math.floor(width * scale))
    fit_h = max(1, min(math.floor(height * scale), math.floor(pixels / fit_w)))
    return fit_w, fit_h


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) array in [0, 1] (or uint8) → PNG bytes."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
