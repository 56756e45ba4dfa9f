"""A generic, procedurally drawn image-text corpus for pretraining the tiny model.

Each item is a small picture: a background (flat, grain, clouds, stripes or a gradient, in
any tint) with a few listed regions, each holding one generic thing (a line, spots, a blob,
a bright or a dark patch, a texture change) or nothing. The questions ask what each listed
region holds, which region holds a given thing or is brightest, how many hold something, or
for a one-line description of the picture. Region answers have the SFT answer's shape with
generic words (`R2: marked | blob`, `R1: plain`), so fine-tuning only has to remap words.

A share of items (`recall`) has no picture: each listed region's line ends with a word
naming what it holds (a synonym: "stroke" for a line), and the answer is the same list. It
teaches the language model, cheaply, to find region k's evidence in the prompt when it
writes answer line k — what the picture items need with a crop in place of the word.

Nothing here comes from the demo (`defectvlm.data.demo`): no powder bed, no defect classes,
no defect stamps, no defect or inspection wording. Only the region frame is shared with
the SFT step (`<regions>` with `Rk: [x1, y1, x2, y2]` lines and one crop per region, built
by `defectvlm.data.sft.user_content`), so a fine-tuned model meets the same layout.
Every item draws from its own generator keyed by (seed, index): same bytes in any order.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from defectvlm import exact_math
from defectvlm.config import SftParams
from defectvlm.data.sft import load_templates, user_content
from defectvlm.models.families import get_family

THINGS = ("line", "spots", "blob", "bright patch", "dark patch", "texture")
NOTHING = "nothing"
BACKGROUNDS = ("flat", "grain", "clouds", "stripes", "gradient")
TASK_WEIGHTS = {"list": 0.7, "which": 0.1, "brightest": 0.08, "count": 0.07, "describe": 0.05}
PLAIN, MARKED = "plain", "marked"  # the answer's words for an empty region and for one holding a thing
SYNONYMS = {  # recall items: the word written after a region's line in the prompt
    NOTHING: "empty",
    "line": "stroke",
    "spots": "dots",
    "blob": "lump",
    "bright patch": "light area",
    "dark patch": "shadow",
    "texture": "pattern change",
}
SYSTEM = "You look at pictures. Answer only about the regions listed in <regions>, one line per region when asked."
QUESTIONS = {
    "list": "What does each listed region hold?",
    "recall": "What does each listed region hold, by its note?",
    "which": "Which listed region holds a {thing}?",
    "brightest": "Which listed region is the brightest?",
    "count": "How many listed regions hold something?",
    "describe": "Describe the picture in one line.",
}
MIN_PIXELS, MAX_PIXELS = 3136, 112 * 112  # whole-image budget of the corpus (crops are separate)
_MAX_REGIONS = 6
_GAP = 4


@dataclass(frozen=True)
class Region:
    xyxy: tuple[int, int, int, int]
    thing: str


def _upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(coarse.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _texture(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A zero-mean grey texture of the given kind."""
    if kind == "flat":
        return rng.normal(0.0, rng.uniform(1.0, 5.0), (height, width)).astype(np.float32)
    if kind == "grain":
        return rng.normal(0.0, rng.uniform(8.0, 22.0), (height, width)).astype(np.float32)
    if kind == "clouds":
        cells = int(rng.integers(3, 9))
        return rng.uniform(10.0, 35.0) * _upsample(rng.standard_normal((cells, cells)), height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    along = x * exact_math.cos(angle) + y * exact_math.sin(angle)
    if kind == "stripes":
        return rng.uniform(8.0, 30.0) * exact_math.sin(2 * math.pi * along / rng.uniform(4.0, 16.0)).astype(np.float32)
    return (rng.uniform(20.0, 60.0) * (along / max(along.max(), 1.0) - 0.5)).astype(np.float32)


def _place(rng: np.random.Generator, width: int, height: int, placed: list[Region]) -> tuple[int, ...] | None:
    for _ in range(40):
        if rng.random() < 0.3:  # long thin boxes as well as compact ones
            w, h = int(rng.uniform(0.3, 0.9) * width), int(rng.uniform(8, 24))
            w, h = (w, h) if rng.random() < 0.5 else (h, min(w, height - 2))
        else:
            w, h = (int(rng.uniform(0.08, 0.4) * side) + 10 for side in (width, height))
        w, h = min(w, width - 2), min(h, height - 2)
        x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = (x1, y1, x1 + w, y1 + h)
        if all(
            max(o.xyxy[0] - box[2], box[0] - o.xyxy[2], o.xyxy[1] - box[3], box[1] - o.xyxy[3]) >= _GAP for o in placed
        ):
            return box
    return None


def _paint(rng: np.random.Generator, grey: np.ndarray, box: tuple[int, ...], thing: str) -> None:
    """Paint `thing` into grey[box] so that it fills the box (the box is its bounding box)."""
    x1, y1, x2, y2 = box
    region = grey[y1:y2, x1:x2]
    h, w = region.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    contrast = rng.uniform(35.0, 110.0)
    if thing == "line":
        thickness = rng.uniform(1.5, max(2.0, min(6.0, min(h, w) / 2)))
        if w >= h:  # from the left edge to the right one, at a slant that fits the box
            centre = rng.uniform(0.3, 0.7) * h + (x / max(w - 1, 1) - 0.5) * rng.uniform(-0.6, 0.6) * (h - thickness)
            coverage = np.clip(thickness / 2 + 0.5 - np.abs(y - centre), 0.0, 1.0)
        else:
            centre = rng.uniform(0.3, 0.7) * w + (y / max(h - 1, 1) - 0.5) * rng.uniform(-0.6, 0.6) * (w - thickness)
            coverage = np.clip(thickness / 2 + 0.5 - np.abs(x - centre), 0.0, 1.0)
        region += sign * contrast * coverage
    elif thing == "spots":
        for _ in range(int(rng.integers(3, 12))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.2, max(1.5, min(h, w) / 6))
            region += sign * contrast * np.clip(r + 0.5 - np.sqrt((y - cy) ** 2 + (x - cx) ** 2), 0.0, 1.0)
    elif thing == "blob":
        lobes, phase, wobble = int(rng.integers(2, 6)), rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.25)
        dy, dx = (y - h / 2 + 0.5) / (h / 2), (x - w / 2 + 0.5) / (w / 2)
        rho = np.sqrt(dy * dy + dx * dx) * (1.0 + wobble * exact_math.cos(lobes * exact_math.atan2(dy, dx) + phase))
        region += sign * contrast * np.clip((1.0 - rho) * min(h, w) / 3, 0.0, 1.0)
    elif thing in ("bright patch", "dark patch"):
        soft = np.minimum(np.minimum(x + 1, w - x), np.minimum(y + 1, h - y)) / rng.uniform(1.0, 6.0)
        direction = 1.0 if thing == "bright patch" else -1.0
        inner = _texture(rng, str(rng.choice(["flat", "grain", "stripes"])), h, w) * 0.5
        region += (direction * rng.uniform(35.0, 90.0) + inner) * np.clip(soft, 0.0, 1.0)
    else:  # texture: the background's pattern replaced by another one, same mean level
        mean = float(region.mean())
        other = _texture(rng, str(rng.choice(["grain", "stripes", "clouds", "flat"])), h, w) * rng.uniform(1.2, 2.5)
        region[...] = mean + other + rng.uniform(-15.0, 15.0)


def region_answer(rid: str, thing: str) -> str:
    """`R2: marked | blob` or `R1: plain`: the SFT answer line's shape with generic words."""
    return f"{rid}: {PLAIN}" if thing == NOTHING else f"{rid}: {MARKED} | {thing}"


def draw_item(seed: int, index: int, single: bool = False) -> tuple[Image.Image, list[Region], str]:
    """The picture, its regions (objects and empty ones, in listing order) and its background kind;
    `single`: one region only."""
    rng = np.random.default_rng([seed, index])
    width, height = 8 * int(rng.integers(16, 41)), 8 * int(rng.integers(16, 41))
    background = str(rng.choice(BACKGROUNDS))
    grey = rng.uniform(50.0, 200.0) + _texture(rng, background, height, width)
    regions: list[Region] = []
    # a third of the items list one region: the word depends on its crop alone, which is learnt
    # first; the others then teach which crop each answer line belongs to
    count = 1 if rng.random() < 0.35 or single else int(rng.integers(2, _MAX_REGIONS + 1))
    for _ in range(count):
        box = _place(rng, width, height, regions)
        if box is None:
            break
        thing = NOTHING if rng.random() < 0.4 else str(rng.choice(THINGS))
        if thing != NOTHING:
            _paint(rng, grey, box, thing)
        regions.append(Region(box, thing))
    tint = rng.uniform(0.75, 1.25, 3).astype(np.float32)
    rgb = np.clip(grey[:, :, None] * tint + rng.normal(0.0, 2.0, (height, width, 1)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB"), regions, background


def _answer(task: str, regions: list[dict], rng: np.random.Generator, background: str) -> tuple[str, str]:
    """(question, answer) for one task."""
    lines = [region_answer(r["rid"], r["thing"]) for r in regions]
    if task == "list":
        return QUESTIONS["list"], "\n".join(lines)
    if task == "which":
        thing = str(rng.choice(THINGS))
        holders = [r["rid"] for r in regions if r["thing"] == thing]
        return QUESTIONS["which"].format(thing=thing), ", ".join(holders) or "none"
    if task == "brightest":
        return QUESTIONS["brightest"], max(regions, key=lambda r: r["level"])["rid"]
    if task == "count":
        return QUESTIONS["count"], "\n".join([str(sum(r["thing"] != NOTHING for r in regions)), *lines])
    things = [r["thing"] for r in regions if r["thing"] != NOTHING]
    return QUESTIONS[
        "describe"
    ], f"A {background} background with {len(things)} thing(s): {', '.join(things) or 'none'}."


@functools.cache
def _frame_templates() -> dict:
    """The SFT step's region frame (`<regions>` block and `Rk: [box]` line), nothing else."""
    templates = load_templates(SftParams())
    return {key: templates[key] for key in ("region_line", "regions_block")}


def build_recall_item(seed: int, index: int, single: bool = False) -> dict:
    """A text-only item: the region lines end with a note naming what each holds; the answer lists them."""
    rng = np.random.default_rng([seed, index, 2])
    count = 1 if single else int(rng.integers(1, _MAX_REGIONS + 1))
    lines, answers, things = [], [], []
    for k in range(1, count + 1):
        x1, y1 = (int(v) for v in rng.integers(0, 900, 2))
        x2, y2 = x1 + int(rng.integers(10, 120)), y1 + int(rng.integers(10, 120))
        thing = NOTHING if rng.random() < 0.4 else str(rng.choice(THINGS))
        region_line = _frame_templates()["region_line"].format(rid=f"R{k}", x1=x1, y1=y1, x2=x2, y2=y2)
        lines.append(f"{region_line} {SYNONYMS[thing]}")
        answers.append(region_answer(f"R{k}", thing))
        things.append(thing)
    block = _frame_templates()["regions_block"].format(lines="\n".join(lines))
    return {
        "id": f"generic-{index:06d}",
        "task": "recall",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": f"{QUESTIONS['recall']}\n{block}"}]},
            {"role": "assistant", "content": "\n".join(answers)},
        ],
        "meta": {"things": things, "crops": False},
    }


def build_item(seed: int, index: int, folder, crop_size: int, single: bool = False) -> tuple[dict, bytes]:
    """One conversation (native SFT layout, image written under `folder`) and the image bytes;
    `single`: one listed region, asked what it holds."""
    picture, drawn, background = draw_item(seed, index, single)
    grey = np.asarray(picture.convert("L"), dtype=np.float32)
    family = get_family("qwen2_5_vl")
    width, height = picture.size
    frame = family.frame(width, height, MIN_PIXELS, MAX_PIXELS)
    regions = [
        {
            "rid": f"R{k}",
            "xyxy": list(r.xyxy),
            "box": family.to_native(list(r.xyxy), width, height, frame),
            "thing": r.thing,
            "level": float(grey[r.xyxy[1] : r.xyxy[3], r.xyxy[0] : r.xyxy[2]].mean()),
        }
        for k, r in enumerate(drawn, start=1)
    ]
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    path = folder / f"item_{index:06d}.jpg"
    path.write_bytes(data)

    rng = np.random.default_rng([seed, index, 1])
    task = "list" if single else str(rng.choice(list(TASK_WEIGHTS), p=list(TASK_WEIGHTS.values())))
    question, answer = _answer(task, regions, rng, background)
    params = SftParams(region_encoding="coords+crops", crop_size=crop_size)
    image = {"path": str(path), "regions": regions}
    sample = {
        "id": f"generic-{index:06d}",
        "task": task,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_content(image, question, _frame_templates(), params)},
            {"role": "assistant", "content": answer},
        ],
        "meta": {"things": [r["thing"] for r in regions], "crops": True},  # in crop order (pretrain_tiny's crop loss)
    }
    return sample, data
