"""Scoring several prompts that begin alike without redoing their beginning.

`predict` asks about an image's candidate regions in chunks (at most the training maximum of
regions per prompt), so the conversations of a chunk's samples agree up to and including their
first image: the system prompt and the whole image. In a batch, the samples sharing that prefix
form a group: the group's prefix is preprocessed, encoded by the vision tower and run through the
language model once, and each sample's rest (its question, regions, crops, answer and the
scoring pass's branches) runs on the prefix's cached keys and values. A batch of different
images (a service's batch, evaluation, predict over a folder) still shares its system prompt:
then the prefix ends before the first image and every image goes with the rest. The numbers
are those of one forward per sample (up to float rounding; tests/evaluate/test_scoring.py and
test_shared_prefix.py check both against the slow reference).

The split is right after (or right before) the first image token of the rendered conversation
(a special token, so the tokenizer splits there in any case); `collate_shared` checks that the
pieces add up to the sample's known token count and otherwise leaves the batch to the plain
collator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defectvlm.train.data import Collator, Encoded, load_part

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class SharedPrefix:
    """The prefixes' forward (one row per group) and where each row of the batch starts after it."""

    prefix_pixels: dict  # the processor's image tensors (pixel_values, image_grid_thw) of the groups' first images
    rest_pixels: dict  # those of the rows' other images (crops), or {}
    group: list[int]  # the group of each row
    lengths: list[int]  # the prefix length (tokens) of each row


def _split(item: Encoded, image_token: str | None, after_image: bool) -> tuple[str, str] | None:
    if not image_token or not item.images or image_token not in item.text:
        return None
    if after_image and "crop" in item.images[0]:
        return None
    cut = item.text.index(image_token) + (len(image_token) if after_image else 0)
    return item.text[:cut], item.text[cut:]


def _grouping(items: list[Encoded], image_token: str | None) -> tuple[bool, list, list[tuple]] | None:
    """(whether the prefix ends after the first image, each item's split, each item's group key),
    for the first way of splitting that leaves fewer groups than items, else None."""
    for after_image in (True, False):
        splits = [_split(item, image_token, after_image) for item in items]
        if None in splits:
            continue
        keys = [
            (split[0], item.images[0]["image"] if after_image else None)
            for item, split in zip(items, splits, strict=True)
        ]
        if len(set(keys)) < len(items):
            return after_image, splits, keys
    return None


def collate_shared(processor, collate: Collator, items: list[Encoded]) -> tuple[dict, SharedPrefix | None]:
    """`collate(items)`'s batch (without pixel values when shared) and the shared prefix, or the
    plain batch and None when no two items share a prefix. The prefix is the system prompt and the
    first image where items share both (the chunks of one image's regions), else the system prompt
    alone (a batch of different images: a service's batch, predict over a folder)."""
    grouping = _grouping(items, getattr(processor, "image_token", None))
    if grouping is None:
        return collate(items), None
    after_image, splits, keys = grouping
    groups: dict[tuple, int] = {}
    for key in keys:
        groups.setdefault(key, len(groups))
    cache: dict = {}  # each file decoded once per batch
    firsts = [keys.index(key) for key in groups]
    prefix = processor(
        text=[splits[i][0] for i in firsts],
        images=[load_part(items[i].images[0], cache) for i in firsts] if after_image else None,
        padding=True,
        return_tensors="pt",
    )
    in_rest = [item.images[1:] if after_image else item.images for item in items]
    parts = [load_part(part, cache) for images in in_rest for part in images]
    rest = processor(text=[split[1] for split in splits], images=parts or None, padding=True, return_tensors="pt")
    group = [groups[key] for key in keys]
    rows, grids, lengths = [], [], []
    grid_at = 0
    for row, item in enumerate(items):
        g = group[row]
        real_prefix, real_rest = prefix["attention_mask"][g].bool(), rest["attention_mask"][row].bool()
        pieces = {
            name: torch.cat([prefix[name][g][real_prefix], rest[name][row][real_rest]])
            for name in ("input_ids", "mm_token_type_ids")
            if name in prefix
        }
        if len(pieces["input_ids"]) != item.length:  # not the sample's own tokens: no sharing
            return collate(items), None
        rows.append(pieces)
        lengths.append(int(real_prefix.sum()))
        if "image_grid_thw" in prefix or "image_grid_thw" in rest:  # M-RoPE positions need every image's grid
            if after_image:
                grids.append(prefix["image_grid_thw"][g : g + 1])
            if in_rest[row]:
                grids.append(rest["image_grid_thw"][grid_at : grid_at + len(in_rest[row])])
                grid_at += len(in_rest[row])
    batch = _right_padded(rows, processor.tokenizer.pad_token_id or 0)
    if grids:
        batch["image_grid_thw"] = torch.cat(grids)
    batch["labels"] = torch.stack([collate.answer_labels(ids) for ids in batch["input_ids"]])
    prefix_pixels = {k: v for k, v in prefix.items() if k not in TEXT_KEYS}
    rest_pixels = {k: v for k, v in rest.items() if k not in TEXT_KEYS} if parts else {}
    shared = SharedPrefix(prefix_pixels, rest_pixels, group, lengths)
    return batch, shared


def _right_padded(rows: list[dict], pad_id: int) -> dict:
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
    for name in rows[0]:
        batch[name] = torch.full((len(rows), length), pad_id if name == "input_ids" else 0, dtype=rows[0][name].dtype)
        for r, row in enumerate(rows):
            batch[name][r, : len(row[name])] = row[name]
    for r, row in enumerate(rows):
        batch["attention_mask"][r, : len(row["input_ids"])] = 1
    return batch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, queries, keys) booleans -> the (rows, 1, queries, keys) mask attention adds."""
    return torch.zeros(allowed.shape, dtype=dtype)[:, None].masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def shared_forward(
    lm, extended: dict, allowed: torch.Tensor, shared: SharedPrefix, pad_id: int, device, dtype
) -> tuple:
    """The last hidden states of the batch `extended` (input ids, position ids, token types,
    with the tree `allowed` (rows, length, length) of the scoring pass), computed as one forward
    of the groups' prefixes and one of the rows' rests on the prefixes' cache. Returns (hidden
    states of the rests, each row's offset: the hidden state of position i of row r is at i - offset)."""
    ids, positions = extended["input_ids"], extended["position_ids"]
    types = extended.get("mm_token_type_ids")
    rows, total = ids.shape
    lengths = shared.lengths
    n_groups, longest = max(shared.group) + 1, max(lengths)
    first = [shared.group.index(g) for g in range(n_groups)]

    prefix_ids = torch.full((n_groups, longest), pad_id, dtype=ids.dtype)
    prefix_positions = torch.zeros((*positions.shape[:-2], n_groups, longest), dtype=positions.dtype)
    prefix_allowed = torch.eye(longest, dtype=torch.bool).repeat(n_groups, 1, 1)
    prefix_types = torch.zeros((n_groups, longest), dtype=types.dtype) if types is not None else None
    for g, row in enumerate(first):
        n = lengths[row]
        prefix_ids[g, :n] = ids[row, :n]
        prefix_positions[..., g, :n] = positions[..., row, :n]
        prefix_allowed[g, :n, :n] = allowed[row, :n, :n]
        if types is not None:
            prefix_types[g, :n] = types[row, :n]
    inputs = {
        "input_ids": prefix_ids,
        "position_ids": prefix_positions,
        "attention_mask": additive_mask(prefix_allowed, dtype),
        **({"mm_token_type_ids": prefix_types} if types is not None else {}),
        **shared.prefix_pixels,
    }
    cache = lm.model(**_on(inputs, device, dtype), use_cache=True).past_key_values
    cache.batch_select_indices(torch.tensor(shared.group, device=device))

    span = total - min(lengths)
    rest_ids = torch.full((rows, span), pad_id, dtype=ids.dtype)
    rest_positions = torch.zeros((*positions.shape[:-2], rows, span), dtype=positions.dtype)
    rest_allowed = torch.zeros((rows, span, longest + span), dtype=torch.bool)
    rest_allowed[:, :, longest:] = torch.eye(span, dtype=torch.bool)
    rest_types = torch.zeros((rows, span), dtype=types.dtype) if types is not None else None
    for row in range(rows):
        start = lengths[row]
        n = total - start
        rest_ids[row, :n] = ids[row, start:]
        rest_positions[..., row, :n] = positions[..., row, start:]
        rest_allowed[row, :n, :start] = allowed[row, start:, :start]
        rest_allowed[row, :n, longest : longest + n] = allowed[row, start:, start:]
        if types is not None:
            rest_types[row, :n] = types[row, start:]
    inputs = {
        "input_ids": rest_ids,
        "position_ids": rest_positions,
        "attention_mask": additive_mask(rest_allowed, dtype),
        **({"mm_token_type_ids": rest_types} if types is not None else {}),
        **shared.rest_pixels,
    }
    hidden = lm.model(**_on(inputs, device, dtype), past_key_values=cache, use_cache=False).last_hidden_state
    return hidden, lengths


def _on(inputs: dict, device, dtype) -> dict:
    moved = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved
