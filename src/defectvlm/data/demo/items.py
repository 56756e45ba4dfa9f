"""What every part of the demo generator shares: the classes, the item jobs and the boxes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

DEFECT_CLASSES: dict[str, str] = {
    "streak": "条纹",
    "slag": "灰渣",
    "over_melt": "过熔",
    "incomplete_spreading": "铺粉不完全",
}
LABEL_FORMATS = ("semicolon", "yolo", "labelstudio")
CANONICAL_CLASSES = tuple(DEFECT_CLASSES)

# Many small batch folders (3 abnormal + 3 normal images each at the default counts): the split
# groups by folder, so val and test each get several of them (>= 40 images) under split.seed 42.
BATCH_COUNT = 60
DEFAULT_COUNT = 180  # images per root

FloatImage = np.ndarray  # float32, shape (height, width), grey levels around 0..255


@dataclass(frozen=True)
class Kind:
    code: int
    root: str
    prefix: str
    label: str
    has_defects: bool


ABNORMAL = Kind(code=1, root="abnormal_root", prefix="am", label="abnormal", has_defects=True)
NORMAL = Kind(code=2, root="normal_root", prefix="nm", label="normal", has_defects=False)


class Stream(IntEnum):
    IMAGE = 0
    LABEL = 1


@dataclass(frozen=True)
class ItemJob:
    out: Path
    seed: int
    kind: Kind
    index: int
    label_format: str

    @property
    def name(self) -> str:
        return f"{self.kind.prefix}_{self.index:04d}"

    @property
    def batch(self) -> str:
        return f"batch_{self.index % BATCH_COUNT + 1:02d}"

    @property
    def relative_image_path(self) -> str:
        return f"{self.kind.root}/{self.batch}/{self.name}.jpg"

    def rng(self, stream: Stream) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.kind.code, self.index, int(stream)])


@dataclass(frozen=True)
class Box:
    x1: int
    y1: int
    x2: int
    y2: int
    cls: str

    def gap_to(self, other: Box) -> int:
        """Chebyshev-style gap between boxes; negative when they overlap."""
        dx = max(other.x1 - self.x2, self.x1 - other.x2)
        dy = max(other.y1 - self.y2, self.y1 - other.y2)
        return max(dx, dy)


@dataclass(frozen=True)
class Stamp:
    """A defect of known size, painted in place onto the albedo region under its box."""

    cls: str
    width: int
    height: int
    paint: Callable[[FloatImage, np.random.Generator], None]
