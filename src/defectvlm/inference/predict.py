"""`defectvlm predict`: the model's verdict on new images, region by region.

Each image's candidate regions are put in the model's frame and the prompt is built by
the training code's own `build_sample` (the evaluation prompt: first system prompt, the
`detect` question, the `<regions>` block), in chunks of at most the training maximum of
regions per prompt. Scores come from the batched scoring pass (no generation):

1. every region's answer line is teacher-forced as `normal`: P(abnormal) of each region,
   judged with the regions before it called normal (what most regions are);
2. images with a region at or above the threshold are scored again with those regions
   forced `abnormal | <class>`: the class distribution of every flagged region.

Same images, regions and model give byte-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError
from rich.progress import Progress

from defectvlm.config import SftParams
from defectvlm.data.sft import build_sample
from defectvlm.evaluate.scoring import score_samples
from defectvlm.inference.loading import LoadedModel
from defectvlm.inference.sources import RegionSource, grid_windows
from defectvlm.models.families import get_family
from defectvlm.train.data import load_image

CHUNK = 16  # samples per call of the scoring pass (the progress bar's step)


def region_prompt_sample(
    sample_id: str,
    path: str,
    width: int,
    height: int,
    boxes: list,
    labels: list[tuple[str, str | None]],
    prompt: dict,
    family_name: str,
    min_pixels: int,
    max_pixels: int,
) -> dict:
    """An evaluation-style SFT sample for `boxes` (pixels of the upright image), answered with
    `labels` ((label, class) per box) so the scoring pass can read the model's probabilities."""
    family = get_family(family_name)
    frame = family.frame(width, height, min_pixels, max_pixels)
    regions = [
        {
            "rid": f"R{number}",
            "xyxy": list(box),
            "box": family.to_native(list(box), width, height, frame),
            "label": label,
            "cls": cls,
            "source": "proposal",
        }
        for number, (box, (label, cls)) in enumerate(zip(boxes, labels, strict=True), start=1)
    ]
    image = {
        "id": sample_id,
        "path": path,
        "blake3": "",
        "label": "abnormal" if any(label == "abnormal" for label, _ in labels) else "normal",
        "family": family.name,
        "frame": list(frame),
        "regions": regions,
    }
    sft = SftParams(**prompt["sft"])
    return build_sample(image, "test", sample_id, sft, prompt["templates"], prompt["knowledge"], prompt["classes"])


@dataclass
class Chunk:
    image: int  # index into the readable images
    sample_id: str
    boxes: list[tuple[float, float, float, float]]
    first: int  # index of its first region in the image's list


def predict_images(
    loaded: LoadedModel,
    images: list[Path],
    source: RegionSource | None,
    threshold: float,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """One record per image (see the module doc and DESIGN.md's predictions.jsonl contract)."""
    config = loaded.config
    prompt = config.prompt
    window = prompt["window"]
    records, readable, chunks = [], [], []
    for path in images:
        try:
            image = load_image(str(path))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            records.append({"image": str(path), "verdict": "unreadable", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        width, height = image.size
        candidates = source.regions_for(path) if source else grid_windows(width, height, window)
        boxes = [region.in_pixels(width, height) for region in candidates]
        record = {"image": str(path), "width": width, "height": height, "candidates": candidates, "boxes": boxes}
        index = len(readable)
        readable.append(record)
        for first in range(0, len(boxes), window["max_regions"]):
            chunk_boxes = boxes[first : first + window["max_regions"]]
            chunks.append(Chunk(index, f"{index:06d}-{first:04d}", chunk_boxes, first))

    def sample(chunk: Chunk, labels) -> dict:
        record = readable[chunk.image]
        return region_prompt_sample(
            chunk.sample_id,
            record["image"],
            record["width"],
            record["height"],
            chunk.boxes,
            labels,
            prompt,
            config.family,
            config.min_pixels,
            config.max_pixels,
        )

    normal = [sample(c, [("normal", None)] * len(c.boxes)) for c in chunks]
    first_pass = _score(loaded, normal, batch_size, progress, "scoring regions")
    flagged = {key for key, row in first_pass.items() if row["score"] >= threshold}
    again = []
    for chunk in chunks:
        labels = [
            ("abnormal", config.classes[0]) if (chunk.sample_id, f"R{k}") in flagged else ("normal", None)
            for k in range(1, len(chunk.boxes) + 1)
        ]
        if any(label == "abnormal" for label, _ in labels) and config.classes:
            again.append(sample(chunk, labels))
    second_pass = _score(loaded, again, batch_size, progress, "classifying flagged regions")

    for record in readable:
        record["regions"] = [None] * len(record["boxes"])
    for chunk in chunks:
        record = readable[chunk.image]
        for k in range(len(chunk.boxes)):
            key = (chunk.sample_id, f"R{k + 1}")
            record["regions"][chunk.first + k] = _region(
                chunk.first + k, record, first_pass[key], second_pass.get(key) if key in flagged else None
            )
    for record in readable:
        regions = record.pop("regions")
        score = max((r["p_abnormal"] for r in regions), default=0.0)
        records.append(
            {
                "image": record["image"],
                "verdict": "abnormal" if score >= threshold else "normal",
                "score": score,
                "threshold": threshold,
                "model": {"uri": config.uri, "version": (config.registry or {}).get("version")},
                "width": record["width"],
                "height": record["height"],
                "regions": regions,
            }
        )
    return sorted(records, key=lambda r: r["image"])


def _region(index: int, record: dict, first: dict, second: dict | None) -> dict:
    candidate = record["candidates"][index]
    class_probs = second.get("class_probs") if second else None
    return {
        "id": index + 1,
        "xyxy": [round(v, 1) for v in record["boxes"][index]],
        "p_abnormal": round(first["score"], 6),
        "cls": max(class_probs, key=class_probs.get) if class_probs else None,
        "class_probs": class_probs,
        "proposal": {"score": candidate.score, "cls": candidate.cls, "from": candidate.where},
    }


def _score(loaded: LoadedModel, samples: list[dict], batch_size: int, progress: bool, title: str) -> dict:
    """(sample id, rid) -> the scoring pass's row."""
    rows = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(title, total=len(samples))
        for start in range(0, len(samples), CHUNK):
            part = samples[start : start + CHUNK]
            for row in score_samples(loaded.model, loaded.processor, part, loaded.config.classes, batch_size):
                rows[(row["image_id"], row["rid"])] = row
            bar.advance(task, len(part))
    return rows
