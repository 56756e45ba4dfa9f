import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from defectvlm.data.images import probe_bytes, stored_to_display


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_boxes_map_to_what_exif_transpose_shows(orientation):
    stored = np.zeros((60, 100), dtype=np.uint8)
    stored[10:25, 20:50] = 255  # box x 20..50, y 10..25 on the stored pixels
    probe = probe_bytes(_jpeg(stored, orientation))
    assert probe.orientation == orientation and probe.stored_size == (100, 60)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_jpeg(stored, orientation)))))
    assert (shown.shape[1], shown.shape[0]) == probe.display_size
    ys, xs = np.nonzero(shown > 128)
    x1, y1, x2, y2 = stored_to_display((20, 10, 50, 25), orientation, probe.stored_size)
    assert (x1, y1, x2, y2) == pytest.approx((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), abs=1)


def test_truncation_is_caught_from_the_end_marker_without_decoding():
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert probe_bytes(data).error is None
    assert probe_bytes(data + b"\x00trailer").error is None
    cut = probe_bytes(data[:-200])
    assert cut.error == "truncated_image" and cut.stored_size == (64, 64)
    assert probe_bytes(data[:-200], verify="full").error in ("truncated_image", "unreadable_image")


def test_hash_is_of_the_bytes_and_errors_for_non_images():
    data = _jpeg(np.zeros((8, 8), dtype=np.uint8))
    assert probe_bytes(data).blake3 == probe_bytes(bytes(data)).blake3
    assert probe_bytes(data).blake3 != probe_bytes(data + b"x").blake3
    assert probe_bytes(b"").error == "empty_file"
    assert probe_bytes(b"hello").error == "not_an_image"
    assert probe_bytes(data[:30]).error in ("unreadable_image", "truncated_image")
