"""The four defect kinds: each a stamp of known size, painted in place under its box."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from defectvlm import exact_math
from defectvlm.data.demo.background import upsample
from defectvlm.data.demo.items import CANONICAL_CLASSES, Box, FloatImage, Stamp

_MIN_BOX_GAP = 4
_POWDER_RIDGE_ROWS = 3
_PLACEMENT_ATTEMPTS = 60


def defect_classes(rng: np.random.Generator, *, cycle_position: int) -> list[str]:
    """1-4 classes; the first cycles through all classes so the dataset stays balanced."""
    count = int(rng.integers(1, 5))
    first = CANONICAL_CLASSES[cycle_position % len(CANONICAL_CLASSES)]
    rest = rng.integers(len(CANONICAL_CLASSES), size=count - 1)
    return [first, *(CANONICAL_CLASSES[int(i)] for i in rest)]


def paint_defects(rng: np.random.Generator, albedo: FloatImage, classes: list[str]) -> list[Box]:
    height, width = albedo.shape
    stamps = [_STAMP_SAMPLERS[cls](rng) for cls in classes]
    boxes: list[Box] = []
    for stamp in stamps:
        box = _place(rng, stamp, boxes, width, height)
        if box is None:
            continue
        stamp.paint(albedo[box.y1 : box.y2, box.x1 : box.x2], rng)
        boxes.append(box)
    return boxes


def _place(rng: np.random.Generator, stamp: Stamp, placed: list[Box], width: int, height: int) -> Box | None:
    """Random position inside the image, kept apart from earlier boxes (so IoU is 0)."""
    for _ in range(_PLACEMENT_ATTEMPTS):
        x1 = int(rng.integers(0, width - stamp.width + 1))
        y1 = int(rng.integers(0, height - stamp.height + 1))
        box = Box(x1, y1, x1 + stamp.width, y1 + stamp.height, stamp.cls)
        if all(box.gap_to(other) >= _MIN_BOX_GAP for other in placed):
            return box
    return None


def _local_grid(region: FloatImage) -> tuple[np.ndarray, np.ndarray]:
    height, width = region.shape
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    return y, x


def _smooth_1d(rng: np.random.Generator, length: int, knots: int) -> np.ndarray:
    """Smooth random curve, roughly in [0, 1], through `knots` random values."""
    return upsample(rng.random((1, knots)), 1, length)[0]


def _streak_stamp(rng: np.random.Generator) -> Stamp:
    """Thin long line(s) along the recoater direction, darker or brighter than the bed."""
    length = int(rng.integers(120, 601))
    thickness = float(rng.uniform(2.0, 6.0))
    drift = float(rng.uniform(-1.0, 1.0) * min(0.02 * length, 8.0))
    line_gaps = [0.0] if rng.random() < 0.7 else [0.0, float(rng.uniform(thickness + 3, 14.0))]
    margin = 3
    first_centre = margin + thickness / 2 + max(-drift, 0.0)
    centres = tuple((first_centre + gap, first_centre + gap + drift) for gap in line_gaps)
    height = math.ceil(abs(drift) + line_gaps[-1] + thickness) + 2 * margin
    contrast = float(rng.uniform(65.0, 100.0)) * (-1.0 if rng.random() < 0.6 else 1.0)
    paint = partial(
        _paint_streak,
        centres=centres,
        thickness=thickness,
        start=margin,
        length=length,
        contrast=contrast,
    )
    return Stamp("streak", length + 2 * margin, height, paint)


def _paint_streak(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    centres: tuple[tuple[float, float], ...],
    thickness: float,
    start: int,
    length: int,
    contrast: float,
) -> None:
    y, x = _local_grid(region)
    progress = np.clip((x - start) / length, 0.0, 1.0)
    # Lines fade in/out at their ends and vary in strength along their length.
    end_fade = np.clip(np.minimum(x - start, start + length - x) / 10.0, 0.0, 1.0)
    strength = end_fade * (0.75 + 0.25 * _smooth_1d(rng, region.shape[1], 6))[None, :]
    for begin, finish in centres:
        centre = begin + (finish - begin) * progress
        coverage = np.clip(thickness / 2 + 0.5 - np.abs(y - centre), 0.0, 1.0)
        region += contrast * coverage * strength


def _slag_stamp(rng: np.random.Generator) -> Stamp:
    """A cluster of dark spatter spots."""
    count = int(rng.integers(4, 13))
    spread = float(rng.uniform(6.0, 20.0))
    centres = np.clip(rng.normal(0.0, spread / 2, (count, 2)), -spread, spread)
    radii = rng.uniform(1.8, 4.0, count)
    radii[0] = rng.uniform(3.5, 6.0)  # one main droplet makes the cluster readable when downscaled
    margin = 2
    low = (centres - radii[:, None]).min(axis=0)
    high = (centres + radii[:, None]).max(axis=0)
    size = np.clip(np.ceil(high - low) + 2 * margin, 15, 60).astype(int)
    # Centre the cluster in its (possibly padded) box.
    offsets = (size - (high - low)) / 2 - low
    spots = tuple(
        (float(cy + offsets[0]), float(cx + offsets[1]), float(r)) for (cy, cx), r in zip(centres, radii, strict=True)
    )
    return Stamp("slag", int(size[1]), int(size[0]), partial(_paint_slag, spots=spots))


def _paint_slag(region: FloatImage, rng: np.random.Generator, *, spots: tuple[tuple[float, float, float], ...]) -> None:
    y, x = _local_grid(region)
    for cy, cx, radius in spots:
        # Irregular droplets rather than perfect discs: the radius wobbles with the angle.
        lobes = int(rng.integers(2, 5))
        angle = exact_math.atan2(y - cy, x - cx)
        wobble = 1.0 + rng.uniform(0.1, 0.3) * exact_math.cos(lobes * angle + rng.uniform(0, 2 * math.pi))
        distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) * wobble
        halo = np.clip(1.0 - (distance - radius) / (radius + 1.0), 0.0, 1.0)
        region -= 18.0 * halo
        core = np.clip(radius + 0.5 - distance, 0.0, 1.0)
        region += (rng.uniform(20.0, 55.0) - region) * core
        if radius > 3.0:  # larger droplets catch a small specular glint
            glint_distance = np.sqrt((y - cy + 0.35 * radius) ** 2 + (x - cx + 0.35 * radius) ** 2)
            glint = np.clip(0.3 * radius + 0.5 - glint_distance, 0.0, 1.0)
            region += (rng.uniform(170.0, 220.0) - region) * glint


def _over_melt_stamp(rng: np.random.Generator) -> Stamp:
    """A bright, glossy, rippled patch of re-melted material."""
    width = int(rng.integers(40, 161))
    height = int(np.clip(width * rng.uniform(0.6, 1.4), 40, 160))
    harmonics = tuple((k, float(rng.uniform(0.0, 0.1)), float(rng.uniform(0.0, 2 * math.pi))) for k in (2, 3, 5))
    paint = partial(
        _paint_over_melt,
        harmonics=harmonics,
        ripple_period=float(rng.uniform(4.0, 9.0)),
        ripple_angle=float(rng.uniform(0.0, math.pi)),
        brightness=float(rng.uniform(195.0, 235.0)),
        highlight=(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))),
    )
    return Stamp("over_melt", width, height, paint)


def _paint_over_melt(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    harmonics: tuple[tuple[int, float, float], ...],
    ripple_period: float,
    ripple_angle: float,
    brightness: float,
    highlight: tuple[float, float],
) -> None:
    height, width = region.shape
    y, x = _local_grid(region)
    semi_y, semi_x = height / 2 - 2, width / 2 - 2
    dy, dx = (y - height / 2 + 0.5) / semi_y, (x - width / 2 + 0.5) / semi_x
    theta = exact_math.atan2(dy, dx)
    outline = 1.0 - sum(amp * (1.0 + exact_math.cos(k * theta + phase)) / 2 for k, amp, phase in harmonics)
    rho = np.sqrt(dx * dx + dy * dy) / outline
    edge_pixels = 2.0 / min(semi_x, semi_y)
    inside = np.clip((1.0 - rho) / edge_pixels, 0.0, 1.0)
    dark_rim = np.clip(1.0 - np.abs(rho - 1.05) / 0.08, 0.0, 1.0)

    along = x * exact_math.cos(ripple_angle) + y * exact_math.sin(ripple_angle)
    warp = 1.5 * ripple_period * upsample(rng.standard_normal((4, 4)), height, width)
    ripple = exact_math.sin(2 * math.pi * (along + 2.0 * rho * ripple_period + warp) / ripple_period)
    surface = rng.standard_normal((height, width), dtype=np.float32)
    glint_y, glint_x = highlight[0] * height, highlight[1] * width
    glint_sigma2 = 2 * (0.15 * min(height, width)) ** 2
    glint = exact_math.exp(-((y - glint_y) ** 2 + (x - glint_x) ** 2) / glint_sigma2)
    gloss = brightness + rng.uniform(12.0, 22.0) * ripple + 35.0 * glint - 25.0 * rho + 5.0 * surface

    region -= 25.0 * dark_rim
    region += (gloss - region) * inside


def _incomplete_spreading_stamp(rng: np.random.Generator) -> Stamp:
    """A region the recoater left bare: darker, smoother, sharp edge along the recoater."""
    width = int(rng.integers(100, 401))
    height = min(220, int(rng.integers(max(40, int(width * 0.2)), max(61, int(width * 0.55)))))
    paint = partial(
        _paint_incomplete_spreading,
        darkening=float(rng.uniform(35.0, 65.0)),
        hatch_angle=float(rng.choice([math.pi / 4, 3 * math.pi / 4, 0.37 * math.pi])),
        hatch_period=float(rng.uniform(5.0, 8.0)),
    )
    return Stamp("incomplete_spreading", width, height, paint)


def _paint_incomplete_spreading(
    region: FloatImage,
    rng: np.random.Generator,
    *,
    darkening: float,
    hatch_angle: float,
    hatch_period: float,
) -> None:
    height, width = region.shape
    y, x = _local_grid(region)
    top = _POWDER_RIDGE_ROWS + 1
    depth = height - top - 1
    crumble = _smooth_1d(rng, width, max(4, width // 6)) - 0.5
    bottom = top + depth * (0.55 + 0.35 * _smooth_1d(rng, width, 6))[None, :] + 5.0 * crumble
    left = 0.12 * width * _smooth_1d(rng, height, 5)[:, None]
    right = width - 1 - 0.12 * width * _smooth_1d(rng, height, 5)[:, None]
    # Sharp top edge (the recoater's blade line), ragged soft bottom and ends.
    bare = (
        (y >= top)
        * np.clip((bottom - y) / 4.0, 0.0, 1.0)
        * np.clip((x - left) / 3.0, 0.0, 1.0)
        * np.clip((right - x) / 3.0, 0.0, 1.0)
    )
    # The previous layer's laser hatch shows through where powder is missing.
    along = x * exact_math.cos(hatch_angle) + y * exact_math.sin(hatch_angle)
    hatch = exact_math.sin(2 * math.pi * along / hatch_period)
    mean = float(region.mean())
    mottling = 6.0 * upsample(rng.standard_normal((4, 6)), height, width)
    substrate = mean - darkening + mottling + 5.0 * hatch + 0.15 * (region - mean)

    # Powder pushed ahead of the blade piles up as a thin bright ridge just above the edge.
    ridge = (y < _POWDER_RIDGE_ROWS) * bare[top : top + 1, :]
    region += 25.0 * ridge
    region += (substrate - region) * bare


_STAMP_SAMPLERS: dict[str, Callable[[np.random.Generator], Stamp]] = {
    "streak": _streak_stamp,
    "slag": _slag_stamp,
    "over_melt": _over_melt_stamp,
    "incomplete_spreading": _incomplete_spreading_stamp,
}
