"""Request bodies -> checked `ImageInput`s. Every problem is a `BadRequest` with an HTTP status
and a message naming the field; nothing here writes to disk or logs the bytes."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Annotated

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from defectvlm.config import ServeParams
from defectvlm.serve.model import ImageInput


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Box(BaseModel):
    model_config = ConfigDict(extra="forbid")

    xyxy: Annotated[list[float], Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels")]

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        x1, y1, x2, y2 = self.xyxy
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"xyxy {self.xyxy} needs x2 > x1 and y2 > y1")
        return self


class InspectRequest(BaseModel):
    """JSON form of /v1/inspect."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="The image file, base64 (a data: URI prefix is accepted).")
    boxes: list[Box] | None = Field(
        None, description="Regions to judge; none: predict's default grid of windows the size of a training defect."
    )


def validation_message(error: ValidationError, prefix: str = "") -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_json(body: bytes) -> InspectRequest:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadRequest(400, f"malformed JSON{where}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    try:
        return InspectRequest.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(422, validation_message(exc)) from None


def parse_boxes_field(text: str | None) -> list[Box] | None:
    """The multipart `boxes` field: the same JSON list as the JSON form's `boxes`."""
    if text is None or not text.strip():
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(400, f"boxes: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, list):
        raise BadRequest(422, f'boxes: expected a JSON list of {{"xyxy": [...]}}, got {type(raw).__name__}')
    try:
        return [Box.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise BadRequest(422, validation_message(exc, "boxes")) from None


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "image: not valid base64") from None


def check_image(data: bytes, boxes: list[Box] | None, limits: ServeParams) -> ImageInput:
    """The checked image with its boxes in pixels of the upright image (see decode_image)."""
    if boxes is not None and len(boxes) > limits.max_boxes:
        raise BadRequest(422, f"boxes: {len(boxes)} boxes, at most {limits.max_boxes} (serve.max_boxes)")
    width, height = decode_image(data, limits)
    return ImageInput(data, width, height, check_boxes(boxes, width, height, limits))


def decode_image(data: bytes, limits: ServeParams, field: str = "image") -> tuple[int, int]:
    """Width, height of the upright image, decoded fully (a truncated file fails here, not in
    the model) and only when its header is within serve.max_image_pixels."""
    if not data:
        raise BadRequest(400, f"{field}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:
                raise BadRequest(
                    413,
                    f"{field}: {image.width}x{image.height} = {pixels} pixels, over serve.max_image_pixels "
                    f"({limits.max_image_pixels})",
                )
            image.load()
            return ImageOps.exif_transpose(image).size
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(413, f"{field}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise BadRequest(400, f"{field}: not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(400, f"{field}: cannot be decoded, truncated or corrupt ({exc})") from None


def check_boxes(boxes: list[Box] | None, width: int, height: int, limits: ServeParams) -> list[list[float]] | None:
    if boxes is None:
        return None  # the model's default windows (see Scorer.to_judge)
    if not boxes:
        raise BadRequest(422, "boxes: empty list (leave it out to judge the default grid)")
    checked = []
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = box.xyxy
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise BadRequest(422, f"boxes[{index}]: {box.xyxy} is outside the {width}x{height} image")
        checked.append(list(box.xyxy))
    return checked
