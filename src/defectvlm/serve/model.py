"""The one seam between the service and a model: a `Scorer` judges regions of decoded images
with predict's own `judge_images` and answers chat turns with generation.

`load_scorer(uri, params)` is where models come from: every URI goes through
`defectvlm.load_model` (registry, run folder or export), whose saved prompt config builds the
prompts; `base` is the untrained base of `params.model` (demo, tests, benchmarks), prompted
with the config training would save for the current `params.sft` and label map.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from defectvlm.config import Params
from defectvlm.errors import StepFailure

if TYPE_CHECKING:  # the model code loads with the model, not with the request schemas
    from defectvlm.inference.loading import LoadedModel
    from defectvlm.inference.predict import ImageToJudge

BASE_URI = "base"
BASE_THRESHOLD = 0.5  # the untrained base has no threshold chosen on val
log = logging.getLogger("defectvlm.serve")


@dataclass(frozen=True)
class ImageInput:
    """A checked upload: its bytes (never written to disk), upright size and boxes in its
    pixels (None: the model's default windows)."""

    data: bytes
    width: int
    height: int
    boxes: list[list[float]] | None


@dataclass
class Scorer:
    """A loaded model and its decision threshold; `version` names it in metrics and /readyz."""

    loaded: LoadedModel
    threshold: float

    @property
    def uri(self) -> str:
        return self.loaded.config.uri

    @property
    def version(self) -> str:
        return str((self.loaded.config.registry or {}).get("version") or self.uri)

    @property
    def classes(self) -> list[str]:
        return self.loaded.config.classes

    @property
    def processor(self):
        return self.loaded.processor

    def to_judge(self, image: ImageInput) -> ImageToJudge:
        from defectvlm.inference.predict import ImageToJudge, default_regions
        from defectvlm.inference.sources import Region

        if image.boxes is None:
            candidates = default_regions(image.width, image.height, self.loaded.config)
        else:
            candidates = [Region(tuple(box), "request") for box in image.boxes]
        return ImageToJudge(None, io.BytesIO(image.data), image.width, image.height, candidates)

    def score(self, images: list[ImageInput]) -> list[dict]:
        """One predictions.jsonl record per image (in order), the batch scored together."""
        from defectvlm.inference.predict import judge_images

        judged = [self.to_judge(image) for image in images]
        # all the batch's prompts together: an image's prompts (runs of its regions) share the image
        return judge_images(self.loaded, judged, self.threshold, batch_size=None)

    def generate(self, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
        """A greedy answer to a conversation whose image parts hold bytes (see chat.py), and the
        number of tokens generated."""
        from defectvlm.evaluate.scoring import generate_token_ids

        sample = {"messages": [*messages, {"role": "assistant", "content": ""}]}
        tokens = generate_token_ids(self.loaded.model, self.loaded.processor, [sample], max_new_tokens)[0]
        return self.loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def load_scorer(uri: str, params: Params, device: str | None = None, tracking_uri: str | None = None) -> Scorer:
    """A Scorer for `uri`: `base`, or anything `defectvlm.load_model` accepts (registry URIs
    are asked of `tracking_uri`, default `params.tracking.uri`)."""
    if uri == BASE_URI:
        return Scorer(base_model(params), BASE_THRESHOLD)
    from defectvlm import load_model

    loaded = load_model(uri, device=device, tracking_uri=tracking_uri or params.tracking.uri)
    threshold = loaded.config.threshold
    if threshold is None:
        log.warning("%s has no threshold (no inference.json): judging at %s", uri, BASE_THRESHOLD)
        threshold = BASE_THRESHOLD
    return Scorer(loaded, float(threshold))


def base_model(params: Params) -> LoadedModel:
    """The untrained base of `params.model` with the prompt config training would save."""
    from defectvlm.data.sft import load_knowledge, load_templates
    from defectvlm.inference.loading import InferenceConfig, LoadedModel
    from defectvlm.models.loading import load_base
    from defectvlm.train.artifacts import prompt_config

    model, processor = load_base(params.model)
    model.eval()
    sft, classes = params.sft, base_classes(params)
    config = InferenceConfig(
        uri=BASE_URI,
        family=params.model.family,
        base=params.model.name_or_path,
        min_pixels=params.model.min_pixels,
        max_pixels=params.model.max_pixels,
        classes=classes,
        prompt=prompt_config(sft, load_templates(sft), load_knowledge(sft), classes, train=[]),
        threshold=BASE_THRESHOLD,
    )
    return LoadedModel(model, processor, config)


def base_classes(params: Params) -> list[str]:
    """The defect classes of the label map (sorted), as build-sft names them."""
    classes = sorted(set(params.labels.label_map.values()))
    if not classes:
        raise StepFailure("labels.label_map is empty: the served model needs its class names")
    return classes
