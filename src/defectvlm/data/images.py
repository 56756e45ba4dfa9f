"""Cheap image facts: content hash, size and EXIF orientation from the header, truncation check.

`probe_image` reads a file's bytes once: they feed the content hash and Pillow's header
parser (which decodes no pixels). A JPEG or PNG whose end marker is missing is reported
as truncated; `verify="full"` also decodes every pixel.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import blake3
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageProbe:
    blake3: str
    size_bytes: int
    format: str | None = None
    stored_size: tuple[int, int] | None = None  # width, height of the pixel array as stored
    orientation: int = 1  # EXIF orientation, 1 = upright
    error: str | None = None  # reason code when the file is not a usable image
    detail: str | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """Width, height as a viewer (and our loader, which applies EXIF) shows the image."""
        w, h = self.stored_size
        return (h, w) if self.orientation in _SWAPS_AXES else (w, h)


def probe_image(path: str, verify: str = "header") -> ImageProbe:
    # One read of the whole file is cheaper than mmap here: the hash then runs on memory
    # that is already in cache, and Pillow parses the header from the same bytes.
    with open(path, "rb", buffering=0) as handle:
        data = handle.read()
    return probe_bytes(data, verify)


def probe_bytes(data: bytes, verify: str = "header") -> ImageProbe:
    return _probe(data, io.BytesIO(data), verify)


def _probe(data: bytes, stream: BinaryIO, verify: str) -> ImageProbe:
    base = {"blake3": blake3.blake3(data).hexdigest(), "size_bytes": len(data)}
    if not len(data):
        return ImageProbe(**base, error="empty_file", detail="the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            header_end = stream.tell()
            orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
            if verify == "full":
                image.load()
    except UnidentifiedImageError:
        return ImageProbe(**base, error="not_an_image", detail="not a format Pillow can read")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        code = "truncated_image" if "truncated" in str(exc) else "unreadable_image"
        return ImageProbe(**base, error=code, detail=str(exc) or type(exc).__name__)
    found = {**base, "format": image.format, "stored_size": image.size, "orientation": orientation}
    if not 1 <= orientation <= 8:
        return ImageProbe(**found, error="bad_exif_orientation", detail=f"EXIF orientation {orientation}")
    if _missing_end_marker(image.format, data, header_end):
        return ImageProbe(**found, error="truncated_image", detail=f"{image.format} end marker missing")
    return ImageProbe(**found)


def _missing_end_marker(fmt: str | None, data: bytes, header_end: int) -> bool:
    if fmt == "JPEG":
        # Pillow stops reading at the main image's start-of-scan; entropy-coded data never
        # holds FFD9 (byte stuffing), so an intact file has an EOI after that point. Searching
        # backwards finds it at once; trailers after the EOI are allowed.
        return data.rfind(b"\xff\xd9", header_end) == -1
    if fmt == "PNG":
        return b"IEND" not in data[-12:]
    return False


def stored_to_display(
    xyxy: tuple[float, float, float, float], orientation: int, stored_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map a box on the stored pixel array to the displayed (EXIF-applied) frame."""
    w, h = stored_size
    points = [_map_point(x, y, orientation, w, h) for x, y in ((xyxy[0], xyxy[1]), (xyxy[2], xyxy[3]))]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _map_point(x: float, y: float, orientation: int, w: int, h: int) -> tuple[float, float]:
    return {
        1: (x, y),
        2: (w - x, y),
        3: (w - x, h - y),
        4: (x, h - y),
        5: (y, x),
        6: (h - y, x),
        7: (h - y, w - x),
        8: (y, w - x),
    }[orientation]


def load_upright(path: str | BinaryIO) -> Image.Image:
    """RGB pixels with the EXIF orientation applied: the displayed frame boxes are written in.
    The one image loader of the project (exports, training, scoring, the detector, predict)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, metadata-free PNG (no EXIF, so no reader can rotate it again); deterministic."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
