"""The powder bed before defects: grain, recoater marks, lighting and camera tint."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from defectvlm import exact_math
from defectvlm.data.demo.items import FloatImage

_ILLUMINATION_GRID_STEP = 16


def upsample(coarse: np.ndarray, height: int, width: int) -> FloatImage:
    resized = Image.fromarray(coarse.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def powder_albedo(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    """Granular grey powder with faint horizontal recoater marks, before lighting."""
    # Uniform noise is much cheaper to draw than Gaussian and reads the same as powder grain.
    fine = rng.random((height, width), dtype=np.float32)
    fine -= 0.5
    fine *= np.float32(math.sqrt(12.0))  # unit variance
    clumps = _box_blur_3x3(fine)
    clumps *= 3.0  # unit variance again
    albedo = rng.uniform(7.0, 12.0) * fine
    albedo += rng.uniform(4.0, 8.0) * clumps
    # The noise's top 0.5% doubles as sparse bright particles.
    albedo += np.float32(30.0) * (fine > np.float32(0.99 * math.sqrt(3.0)))
    albedo += np.float32(rng.uniform(105.0, 165.0))
    albedo += _recoater_profile(rng, height)[:, None]
    return albedo


def _box_blur_3x3(image: FloatImage) -> FloatImage:
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    blurred = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    blurred /= 9.0
    return blurred


def _recoater_profile(rng: np.random.Generator, height: int) -> np.ndarray:
    profile = rng.normal(0.0, 0.8, height).astype(np.float32)
    for _ in range(int(rng.integers(2, 9))):
        row = int(rng.integers(0, height - 2))
        thickness = int(rng.integers(1, 3))
        profile[row : row + thickness] += rng.uniform(-6.0, 6.0)
    return profile


def illumination(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    """Multiplicative lighting: gradient, broad blotches, an optional soft shadow, vignetting.

    Applied to normal and abnormal images alike so that overall darkness or brightness is
    no shortcut for spotting a defect. The field is smooth, so it is computed on a coarse
    grid and upsampled.
    """
    coarse = _coarse_illumination(rng, height // _ILLUMINATION_GRID_STEP + 2, width // _ILLUMINATION_GRID_STEP + 2)
    return upsample(coarse, height, width)


def _coarse_illumination(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    light = 1.0 + rng.uniform(0.03, 0.12) * (x * exact_math.cos(angle) + y * exact_math.sin(angle))
    light = light + rng.uniform(0.02, 0.07) * upsample(rng.standard_normal((4, 5)), height, width)
    light *= 1.0 - rng.uniform(0.08, 0.25) * (x * x + y * y) / 2.0
    if rng.random() < 0.5:
        light *= _soft_shadow(rng, x, y)
    return light.astype(np.float32)


def _soft_shadow(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    side = int(rng.integers(4))
    coordinate = (x, -x, y, -y)[side]
    edge_softness = rng.uniform(0.05, 0.2)
    start = rng.uniform(0.5, 0.9)
    darkness = rng.uniform(0.08, 0.25)
    return 1.0 - darkness / (1.0 + exact_math.exp(-(coordinate - start) / edge_softness))


def tinted_rgb(rng: np.random.Generator, shaded: FloatImage) -> Image.Image:
    """Slightly warm or cool grey, as cameras under chamber lighting record it."""
    grey = Image.fromarray(np.clip(shaded, 0.0, 255.0).astype(np.uint8))
    warmth = rng.uniform(-0.04, 0.06)
    red = grey.point(_scaling_table(1.0 + warmth))
    blue = grey.point(_scaling_table(1.0 - warmth))
    return Image.merge("RGB", (red, grey, blue))


def _scaling_table(factor: float) -> list[int]:
    return [min(255, round(level * factor)) for level in range(256)]
