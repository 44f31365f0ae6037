"""Surface images for the image assessors: bytes in, grayscale float32 in [0, 1] out."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes, reduce: int = 1) -> np.ndarray:
    """PNG or JPEG bytes → (H, W) float32 in [0, 1]; raises ValueError on anything else.

    ``reduce``: each side divided by it (the mean of each block) before the float copy is made, for images far
    larger than any assessor looks at (they resize to 512 px at most)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = image.convert("L")
            if reduce > 1:
                gray = gray.reduce(reduce)
            return np.asarray(gray, dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {exc}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header alone, without decoding it: what a message's images would take
    in memory is known before any of it is spent. Raises ValueError on anything PIL cannot open."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # PIL's words name its BytesIO, which would mean nothing on the rejected topic
        raise ValueError("not a readable image: its header could not be read") from None


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) array in [0, 1] (or uint8) → PNG bytes."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
