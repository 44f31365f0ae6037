"""Surface images as cameras send them: a multi-picture JPEG is reduced by its decoder like any JPEG, and a
16-bit grey frame keeps its grey levels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from ml.images import decode_image
from ml.imagesets.folder import read_gray


def _mpo(side: int) -> bytes:
    """A two-frame MPO (what stereo and burst cameras write): starts like a JPEG, but PIL names it MPO."""
    frame = Image.new("L", (side, side), 128)
    buffer = io.BytesIO()
    frame.save(buffer, "MPO", save_all=True, append_images=[frame])
    return buffer.getvalue()


def test_a_multi_picture_jpeg_is_reduced_by_its_decoder_not_decoded_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's scaling was asked of `format == "JPEG"` only: a 12,000 × 12,000 MPO (776 kB, under the message
    limit) was decoded at full size, 300 MB and half a second a coil, which the JPEG rule meant to prevent."""
    data = _mpo(2048)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    drafts: list[tuple] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):  # type: ignore[no-untyped-def]
        drafts.append((mode, size))
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    pixels = decode_image(data, (256, 256))
    assert drafts == [("L", (256, 256))] and pixels.shape == (256, 256)
    assert pixels.mean() == pytest.approx(128 / 255, abs=0.01)


def test_a_16_bit_grey_image_keeps_its_grey_levels(tmp_path) -> None:
    """PIL's convert("L") clamps 16-bit values at 255: a Mono16 ramp decoded to 99.6 % pure white, in service and in
    a training folder alike, and every image model judged a white frame."""
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    for pixels in (decode_image(buffer.getvalue()), decode_image(buffer.getvalue(), (128, 32))):
        assert pixels.dtype == np.float32 and pixels.mean() == pytest.approx(0.5, abs=0.01)
        assert pixels.min() == pytest.approx(0, abs=0.01) and pixels.max() == pytest.approx(1, abs=0.01)
    path = tmp_path / "frame.png"
    path.write_bytes(buffer.getvalue())
    assert read_gray(path).mean() == pytest.approx(0.5, abs=0.01)
    eight_bit = io.BytesIO()
    Image.fromarray((ramp // 257).astype(np.uint8)).save(eight_bit, "PNG")
    assert decode_image(eight_bit.getvalue()).mean() == pytest.approx(0.5, abs=0.01)  # 8-bit as before
