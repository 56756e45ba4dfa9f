"""SFT samples -> model batches: images loaded upright, the processor's pixel budget, loss
only on the assistant's answer, and length-grouped batches that keep padding low.

Family-blind: image token counts come from the processor itself, the assistant's turn
markers from the family table entry of the processor's family (`family_of`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image

from defectvlm.data.images import load_upright
from defectvlm.models.families import family_of

IGNORE_INDEX = -100
MEGA_BATCH = 32  # batches sorted by length together before their order is shuffled


CROP_CONTEXT = 0.25  # context around a region's box in its crop, per side, as a fraction of the box


def image_parts(sample: dict) -> list[dict]:
    """The image parts of the conversation, in order: the whole image, then any region crops."""
    return [
        part
        for message in sample["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image"
    ]


def load_part(part: dict, cache: dict[str, Image.Image]) -> Image.Image:
    """An image part: the whole image, or a square crop around a region's box (`crop`, `size`)."""
    if part["image"] not in cache:
        cache[part["image"]] = load_upright(part["image"])
    image = cache[part["image"]]
    if "crop" not in part:
        return image
    x1, y1, x2, y2 = part["crop"]
    dx, dy = (x2 - x1) * CROP_CONTEXT + 2, (y2 - y1) * CROP_CONTEXT + 2
    box = (max(0, x1 - dx), max(0, y1 - dy), min(image.width, x2 + dx), min(image.height, y2 + dy))
    return image.crop(tuple(round(v) for v in box)).resize((part["size"], part["size"]), Image.Resampling.BILINEAR)


def prompt_messages(sample: dict) -> list[dict]:
    return sample["messages"][:-1]


@dataclass
class Encoded:
    text: str  # the whole conversation rendered by the chat template
    images: list[dict]  # image parts in order (see image_parts)
    length: int  # tokens after the processor expands the images


class SftDataset(torch.utils.data.Dataset):
    """Native SFT samples; token lengths are known up front (from image headers) for batching."""

    def __init__(self, samples: list[dict], processor):
        self.samples = samples
        self.processor = processor
        self.items = [self._encode(s) for s in samples]

    def _encode(self, sample: dict) -> Encoded:
        text = self.processor.apply_chat_template(sample["messages"], tokenize=False)
        parts = image_parts(sample)
        sizes = []
        for part in parts:
            if "crop" in part:
                sizes.append([part["size"], part["size"]])
            else:
                with Image.open(part["image"]) as image:  # the header only
                    width, height = image.size[::-1] if _rotated(image) else image.size
                sizes.append([height, width])
        # the processor's own count (its resize or tiling); each replaces one placeholder token
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens if sizes else []
        image_tokens = sum(count - 1 for count in counts)
        text_tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Encoded(text, parts, text_tokens + image_tokens)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]


def _rotated(image: Image.Image) -> bool:
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


class Collator:
    """Encoded items -> tensors with labels = -100 everywhere except the assistant's answer
    (its text and the token that closes the turn, both as the family's chat template writes them)."""

    def __init__(self, processor):
        self.processor = processor
        tokenizer = processor.tokenizer
        family = family_of(processor)
        self.header = tokenizer(family.assistant_header, add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids(family.turn_end)

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        images = []
        for item in items:
            cache: dict[str, Image.Image] = {}
            images += [load_part(part, cache) for part in item.images]
        batch = self.processor(text=[item.text for item in items], images=images, padding=True, return_tensors="pt")
        batch["labels"] = torch.stack([self.answer_labels(ids) for ids in batch["input_ids"]])
        return dict(batch)  # mm_token_type_ids included: without it Qwen's M-RoPE falls back to 1-D positions

    def answer_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.tolist()
        n = len(self.header)
        starts = [i + n for i in range(len(ids) - n + 1) if ids[i : i + n] == self.header]
        if not starts:
            raise ValueError("no assistant turn in the sample")
        start = starts[-1]
        end = ids.index(self.end_id, start) + 1 if self.end_id in ids[start:] else len(ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[start:end] = input_ids[start:end]
        return labels


def batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches for one epoch, the same on every process: shuffled by (seed, epoch); with
    length grouping, sorted by length inside mega-batches, then the batch order shuffled."""
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * MEGA_BATCH
        order = [i for k in range(0, len(order), mega) for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])]
    result = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(result)
    return result


def token_efficiency(attention_mask: torch.Tensor) -> float:
    """Real tokens / all tokens of a padded batch."""
    return float(attention_mask.sum()) / attention_mask.numel()
