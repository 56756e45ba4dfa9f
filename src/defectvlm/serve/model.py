"""The one seam between the service and a model: a `Scorer` judges regions of decoded images
with the project's scoring pass and answers chat turns with generation.

`load_scorer(uri, params)` is where models come from: `base` is the untrained base of
`params.model` (demo, tests, benchmarks); every other URI goes through
`defectvlm.load_model` (registry, run folder or export), imported lazily.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from defectvlm.config import Params, SftParams
from defectvlm.errors import StepFailure

BASE_URI = "base"


@dataclass(frozen=True)
class ImageInput:
    """A checked upload: its bytes (never written to disk), upright size and boxes in its pixels."""

    data: bytes
    width: int
    height: int
    boxes: list[list[float]]


@dataclass(frozen=True)
class Prompt:
    """What the training prompt builder needs: templates, glossary and the SFT settings."""

    sft: SftParams
    templates: dict
    knowledge: dict

    @classmethod
    def from_params(cls, sft: SftParams) -> Prompt:
        from defectvlm.data.sft import load_knowledge, load_templates

        return cls(sft, load_templates(sft), load_knowledge(sft))


@dataclass
class Scorer:
    """A loaded model plus what is needed to use it; `version` names it in every response."""

    model: object
    processor: object
    classes: list[str]
    threshold: float
    family: str
    min_pixels: int
    max_pixels: int
    prompt: Prompt
    uri: str
    version: str
    extra: dict = field(default_factory=dict)

    def samples(self, images: list[ImageInput]) -> list[dict]:
        """One scoring sample per image, built by the training prompt builder. Every region's
        answer line is teacher-forced as `abnormal | <first class>` so the pass reads both
        P(abnormal) and the class distribution at every region."""
        from defectvlm.data.sft import build_sample
        from defectvlm.models.families import get_family

        family = get_family(self.family)
        samples = []
        for index, image in enumerate(images):
            frame = family.frame(image.width, image.height, self.min_pixels, self.max_pixels)
            regions = [
                {
                    "rid": f"R{number}",
                    "xyxy": list(box),
                    "box": family.to_native(list(box), image.width, image.height, frame),
                    "label": "abnormal",
                    "cls": self.classes[0],
                    "source": "request",
                }
                for number, box in enumerate(image.boxes, start=1)
            ]
            record = {
                "id": f"request-{index}",
                "path": io.BytesIO(image.data),
                "blake3": "",
                "label": "abnormal",
                "family": family.name,
                "frame": list(frame),
                "regions": regions,
            }
            p = self.prompt
            samples.append(build_sample(record, "test", record["id"], p.sft, p.templates, p.knowledge, self.classes))
        return samples

    def score(self, images: list[ImageInput]) -> list[dict]:
        """Per image (in order): verdict, score and per-region P(abnormal), class probabilities."""
        from defectvlm.evaluate.scoring import score_samples

        samples = self.samples(images)
        rows = score_samples(self.model, self.processor, samples, self.classes, batch_size=max(1, len(samples)))
        by_image: dict[str, list[dict]] = {}
        for row in rows:
            by_image.setdefault(row["image_id"], []).append(row)
        return [
            self.image_result(by_image.get(s["image_id"], []), image) for s, image in zip(samples, images, strict=True)
        ]

    def image_result(self, rows: list[dict], image: ImageInput) -> dict:
        regions = [
            {
                "id": row["rid"],
                "xyxy": [round(v, 2) for v in row["xyxy"]],
                "p_abnormal": round(row["score"], 6),
                "verdict": "abnormal" if row["score"] >= self.threshold else "normal",
                "cls": row.get("pred_cls") if row["score"] >= self.threshold else None,
                "class_probs": row.get("class_probs", {}),
            }
            for row in rows
        ]
        score = max((r["p_abnormal"] for r in regions), default=0.0)
        return {
            "verdict": "abnormal" if score >= self.threshold else "normal",
            "score": score,
            "threshold": self.threshold,
            "width": image.width,
            "height": image.height,
            "model": {"uri": self.uri, "version": self.version},
            "regions": regions,
        }

    def generate(self, messages: list[dict], max_new_tokens: int) -> str:
        """A greedy answer to a conversation whose image parts hold bytes (see chat.py)."""
        from defectvlm.evaluate.scoring import generate_answers

        sample = {"messages": [*messages, {"role": "assistant", "content": ""}]}
        return generate_answers(self.model, self.processor, [sample], max_new_tokens)[0]


def load_scorer(uri: str, params: Params, device: str | None = None) -> Scorer:
    """A Scorer for `uri`: `base`, or anything `defectvlm.load_model` accepts."""
    prompt = Prompt.from_params(params.sft)
    if uri == BASE_URI:
        from defectvlm.models.loading import load_base

        model, processor = load_base(params.model)
        model.eval()
        return Scorer(
            model,
            processor,
            classes=base_classes(params),
            threshold=0.5,
            family=params.model.family,
            min_pixels=params.model.min_pixels,
            max_pixels=params.model.max_pixels,
            prompt=prompt,
            uri=uri,
            version=BASE_URI,
        )
    try:
        from defectvlm import load_model
    except ImportError:
        raise StepFailure(
            f"--model {uri}: this build has no defectvlm.load_model (issue 15) to load registered or trained "
            f"models; only --model {BASE_URI} (the untrained base of params.model) can be served"
        ) from None
    loaded = load_model(uri, device=device)
    config = loaded.config
    return Scorer(
        loaded.model,
        loaded.processor,
        classes=list(config.classes),
        threshold=0.5 if config.threshold is None else float(config.threshold),
        family=config.family,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        prompt=prompt,
        uri=uri,
        version=str((config.registry or {}).get("version", uri)),
    )


def base_classes(params: Params) -> list[str]:
    """The defect classes of the label map (sorted), as build-sft names them."""
    classes = sorted(set(params.labels.label_map.values()))
    if not classes:
        raise StepFailure("labels.label_map is empty: the served model needs its class names")
    return classes
