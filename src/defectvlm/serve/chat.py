"""OpenAI-compatible chat completions: the request schema, the conversion of its messages
(images as data: URIs, decoded and checked like /v1/inspect uploads) to the processor's
conversation, and the answer, parsed into regions when it follows the `Rk: ...` format."""

from __future__ import annotations

import io
import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from defectvlm.config import ServeParams
from defectvlm.serve.inputs import BadRequest, decode_base64, decode_image
from defectvlm.serve.model import Scorer

REGION_ID = re.compile(r"\bR(\d+)\b")


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class ChatRequest(BaseModel):
    """The OpenAI fields this service honours; others are refused, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Any name: the service answers with the model it serves.")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=0, description="Greedy decoding only: 0 or absent.")
    n: int | None = Field(None, ge=1, le=1)
    stream: Literal[False] | None = None
    seed: int | None = None
    user: str | None = None


def conversation(request: ChatRequest, limits: ServeParams) -> tuple[list[dict], list[str]]:
    """(messages for the processor's chat template, region ids named in the user's text)."""
    messages, texts = [], []
    for m, message in enumerate(request.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            texts.append(message.content)
            continue
        parts = []
        for p, part in enumerate(message.content):
            where = f"messages[{m}].content[{p}]"
            if part.type == "text":
                if part.text is None:
                    raise BadRequest(422, f"{where}.text: required for a text part")
                parts.append({"type": "text", "text": part.text})
                texts.append(part.text)
            else:
                if part.image_url is None or not part.image_url.url.startswith("data:"):
                    raise BadRequest(422, f"{where}.image_url: send the image as a data: URI (nothing is fetched)")
                data = decode_base64(part.image_url.url)
                decode_image(data, limits, field=f"{where}.image_url")
                parts.append({"type": "image", "image": io.BytesIO(data)})
        messages.append({"role": message.role, "content": parts})
    if not any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages):
        raise BadRequest(422, "messages: no image_url part; this model judges an image")
    region_ids = sorted({f"R{n}" for text in texts for n in REGION_ID.findall(text)}, key=lambda r: int(r[1:]))
    return messages, region_ids


def answer_regions(answer: str, region_ids: list[str], classes: list[str]) -> dict:
    """The answer's verdict per region named in the question (`Rk: abnormal | cls` lines)."""
    from defectvlm.evaluate.scoring import parse_answer

    parsed = parse_answer(answer, region_ids, classes)
    regions = [{"id": rid, "verdict": label, "cls": cls} for rid, (label, cls) in parsed["regions"].items()]
    return {"regions": regions, "unanswered": parsed["missing"]}


def chat_completion(answer: str, scorer: Scorer, region_ids: list[str], completion_tokens: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{scorer.uri}#{scorer.version}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens, "total_tokens": completion_tokens},
        "defectvlm": {
            "model": {"uri": scorer.uri, "version": scorer.version},
            **answer_regions(answer, region_ids, scorer.classes),
        },
    }
