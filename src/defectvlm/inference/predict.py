"""`defectvlm predict` and `defectvlm serve`: the model's verdict on images, region by region.
`judge_images` is the one scoring of "images + candidate boxes": predict calls it on files,
serve on the uploads of a dynamic batch, and both return the same records.

Each image's candidate regions are put in the model's frame and the prompt is built by
the training code's own `build_sample` (the evaluation prompt: first system prompt, the
`detect` question, the `<regions>` block), in chunks of at most the training maximum of
regions per prompt. Scores come from one batched scoring pass (no generation): every
region's answer line is teacher-forced as `normal`, so each region is judged with the regions
before it called normal (what most regions are); at each region's label word the pass scores
`abnormal` against `normal` (P(abnormal), as `evaluate` does, so the threshold chosen on val
applies) and every whole line `abnormal | <class>` (the class distribution), all in the same
forward. A region at or above the threshold is flagged and reported with its classes. The
chunks of an image share the system prompt and the whole image, which are encoded once per
batch (evaluate/shared_prefix.py).

Same images, regions and model give byte-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import UnidentifiedImageError
from rich.progress import Progress

from defectvlm.config import SftParams
from defectvlm.data.images import load_upright
from defectvlm.data.sft import build_sample
from defectvlm.evaluate.scoring import score_samples
from defectvlm.inference.loading import InferenceConfig, LoadedModel
from defectvlm.inference.sources import Region, RegionSource, grid_windows
from defectvlm.models.families import get_family

CHUNK = 16  # samples per call of the scoring pass (the progress bar's step)


def region_prompt_sample(
    sample_id: str,
    path: str | BinaryIO,
    width: int,
    height: int,
    boxes: list,
    labels: list[tuple[str, str | None]],
    prompt: dict,
    family_name: str,
    min_pixels: int,
    max_pixels: int,
    first_number: int = 1,
) -> dict:
    """An evaluation-style SFT sample for `boxes` (pixels of the upright image), answered with
    `labels` ((label, class) per box) so the scoring pass can read the model's probabilities.
    The regions are R<first_number>, R<first_number + 1>, ... (a later chunk of an image's
    regions keeps counting, as the SFT step's conversations do: sft.prompt_parts)."""
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
        for number, (box, (label, cls)) in enumerate(zip(boxes, labels, strict=True), start=first_number)
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


@dataclass(frozen=True)
class ImageToJudge:
    """One image and the candidate regions to judge on it, in pixels of the upright image."""

    name: str | None  # the record's "image": its path, or None for an upload
    source: str | BinaryIO  # what load_upright opens: a path, or the bytes of an upload
    width: int
    height: int
    candidates: list[Region]


@dataclass
class Chunk:
    image: int  # index into the images judged
    sample_id: str
    boxes: list[tuple[float, float, float, float]]
    first: int  # index of its first region in the image's list
    number: int  # the rid number of its first region (R<number>)


def default_regions(width: int, height: int, config: InferenceConfig) -> list[Region]:
    """Without candidate boxes: windows the size of the model's median training defect."""
    return grid_windows(width, height, config.prompt["window"])


def predict_images(
    loaded: LoadedModel,
    images: list[Path],
    source: RegionSource | None,
    threshold: float,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """One record per image, sorted by path (see DESIGN.md's predictions.jsonl contract)."""
    records, readable = [], []
    for path in images:
        try:
            width, height = load_upright(str(path)).size
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            records.append({"image": str(path), "verdict": "unreadable", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        candidates = source.regions_for(path) if source else default_regions(width, height, loaded.config)
        readable.append(ImageToJudge(str(path), str(path), width, height, candidates))
    records += judge_images(loaded, readable, threshold, batch_size, progress)
    return sorted(records, key=lambda r: r["image"])


def judge_images(
    loaded: LoadedModel,
    images: list[ImageToJudge],
    threshold: float,
    batch_size: int | None = 8,
    progress: bool = False,
) -> list[dict]:
    """The record of each image (in order), scored in batches across all of them (module doc):
    what `predict` writes to predictions.jsonl and `serve` answers."""
    config = loaded.config
    window = config.prompt["window"]
    boxes = [[region.in_pixels(image.width, image.height) for region in image.candidates] for image in images]
    # a model trained on runs of an image's regions (sft.regions_per_prompt) saw their rids keep counting
    counting = bool(config.prompt["sft"].get("regions_per_prompt"))
    chunks = [
        Chunk(
            index,
            f"{index:06d}-{first:04d}",
            image_boxes[first : first + window["max_regions"]],
            first,
            first + 1 if counting else 1,
        )
        for index, image_boxes in enumerate(boxes)
        for first in range(0, len(image_boxes), window["max_regions"])
    ]

    def sample(chunk: Chunk, labels) -> dict:
        image = images[chunk.image]
        return region_prompt_sample(
            chunk.sample_id,
            image.source,
            image.width,
            image.height,
            chunk.boxes,
            labels,
            config.prompt,
            config.family,
            config.min_pixels,
            config.max_pixels,
            chunk.number,
        )

    samples = []
    for chunk in chunks:
        normal = [("normal", None)] * len(chunk.boxes)
        judged = sample(chunk, normal)
        if config.classes:  # each region's abnormal line, to score its class in the same forward
            judged["meta"]["class_answers"] = {
                f"R{chunk.number + k}": sample(chunk, [*normal[:k], ("abnormal", config.classes[0]), *normal[k + 1 :]])[
                    "messages"
                ][2]["content"]
                for k in range(len(chunk.boxes))
            }
        samples.append(judged)
    # batch_size None: every prompt in one batch (serve: a request's prompts share their image)
    scored = _score(loaded, samples, batch_size or len(samples), progress, "scoring regions")

    regions = [[None] * len(image_boxes) for image_boxes in boxes]
    for chunk in chunks:
        for k in range(len(chunk.boxes)):
            row = scored[chunk.sample_id, f"R{chunk.number + k}"]
            index = chunk.first + k
            candidate = images[chunk.image].candidates[index]
            regions[chunk.image][index] = _region(index, candidate, chunk.boxes[k], row, row["score"] >= threshold)
    model = {"uri": config.uri, "version": (config.registry or {}).get("version")}
    return [_record(image, found, threshold, model) for image, found in zip(images, regions, strict=True)]


def _record(image: ImageToJudge, regions: list[dict], threshold: float, model: dict) -> dict:
    score = max((r["p_abnormal"] for r in regions), default=0.0)
    return {
        "image": image.name,
        "verdict": "abnormal" if score >= threshold else "normal",
        "score": score,
        "threshold": threshold,
        "model": model,
        "width": image.width,
        "height": image.height,
        "regions": regions,
    }


def _region(index: int, candidate: Region, box: tuple, scored: dict, flagged: bool) -> dict:
    class_probs = scored.get("class_probs") if flagged else None
    return {
        "id": index + 1,
        "xyxy": [round(v, 1) for v in box],
        "p_abnormal": round(scored["score"], 6),
        "cls": max(class_probs, key=class_probs.get) if class_probs else None,
        "class_probs": class_probs,
        "proposal": {"score": candidate.score, "cls": candidate.cls, "from": candidate.where},
    }


def _score(loaded: LoadedModel, samples: list[dict], batch_size: int, progress: bool, title: str) -> dict:
    """(sample id, rid) -> the scoring pass's row."""
    rows = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(title, total=len(samples))
        step = max(CHUNK, batch_size)  # a batch is never split across calls (serve: one batch of all)
        for start in range(0, len(samples), step):
            part = samples[start : start + step]
            for row in score_samples(loaded.model, loaded.processor, part, loaded.config.classes, batch_size):
                rows[(row["image_id"], row["rid"])] = row
            bar.advance(task, len(part))
    return rows
