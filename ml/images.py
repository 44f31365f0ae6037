"""Surface images for the image assessors: bytes in, grayscale float32 in [0, 1] out."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# What PIL refuses to open (its decompression-bomb limit): the size is then not known, only that it is over this.
OVER_PIL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485) + 1


def decode_image(data: bytes, reduce: int = 1) -> np.ndarray:
    """PNG or JPEG bytes → (H, W) float32 in [0, 1]; raises ValueError on anything else.

    ``reduce``: each side divided by it (rounded up) before the float copy is made, for images far larger than
    any assessor looks at (they resize to 512 px at most): a JPEG is decoded at the smaller scale straight
    away, anything else in full and then reduced by the mean of each block."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = (-(-image.width // reduce), -(-image.height // reduce))
            if reduce > 1 and image.format == "JPEG":
                image.draft("L", target)  # the decoder's own scaling: never below the target
            gray = image.convert("L")
            if (factor := -(-gray.width // target[0])) > 1:  # what the decoder's scaling left, rounded up
                gray = gray.reduce(factor)
            return np.asarray(gray, dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {exc}") from None


def image_pixels(data: bytes) -> int:
    """Width × height from the file's header alone, without decoding it: what an image would take in memory is
    known before any of it is spent (``OVER_PIL_LIMIT`` for one PIL will not even open). Raises ValueError on
    anything PIL cannot read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Image.DecompressionBombError:
        return OVER_PIL_LIMIT
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
