"""Every family on its real transformers classes (tiny, random): selection from params, boxes
in the frame of the family's own processor, SFT in its chat template, answer-only labels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from defectvlm.config import ModelParams
from defectvlm.data.images import load_upright
from defectvlm.errors import StepFailure
from defectvlm.models import attention
from defectvlm.models.families import NORMALISED_RANGE, family_of, get_family
from defectvlm.models.loading import load_base
from defectvlm.train.data import IGNORE_INDEX, Collator, SftDataset, image_parts
from tests.models.conftest import FAMILIES, MAX_PIXELS, MIN_PIXELS, tiny


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "internvl"])
def test_tiny_random_selects_the_familys_real_classes(name):
    family = get_family(name)
    model, processor = load_base(ModelParams(family=name, name_or_path="tiny-random", attn_implementation="eager"))
    assert type(model).__name__ == family.model_class
    assert type(processor).__name__ == family.processor_class
    assert family_of(processor) is family
    assert model.config._attn_implementation == "eager"
    assert len(model.get_submodule(family.vision_blocks)) == 4


def test_tiny_random_refuses_qlora():
    with pytest.raises(StepFailure, match="qlora"):
        load_base(ModelParams(family="internvl", name_or_path="tiny-random"), qlora=True)


def _processor_frame(family, processor, image: Image.Image) -> tuple[int, int]:
    """Width, height of the image as the family's processor feeds it (Qwen: grid x patch)."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    patch = processor.image_processor.patch_size
    return grid_w * patch, grid_h * patch


@pytest.mark.parametrize("name", FAMILIES)
def test_region_boxes_are_in_the_frame_of_the_familys_processor(name, family_sft):
    family = get_family(name)
    _, processor = tiny(name)
    _, samples = family_sft(name)
    for sample in samples[:4]:
        image = load_upright(sample["images"][0])
        assert sample["meta"]["family"] == name
        frame = sample["meta"]["frame"]
        if family.tile_size is not None:  # InternVL: tiles of the family's size, boxes normalised
            tiles = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            assert tiles.shape[-2:] == (family.tile_size, family.tile_size)
            assert 1 <= len(tiles) <= family.processor_kwargs(MIN_PIXELS, MAX_PIXELS)["max_patches"] + 1
            seen = (image.width, image.height)
        else:
            seen = _processor_frame(family, processor, image)
            assert family.resized(image.width, image.height, MIN_PIXELS, MAX_PIXELS) == seen
        if family.coords == "resized_pixels":
            assert frame == list(seen)
        else:
            assert frame == [NORMALISED_RANGE, NORMALISED_RANGE]
        for region in sample["meta"]["regions"]:
            # the box, read in the frame, lands where the labelled pixels are in what the model sees
            in_seen = [v * s / f for v, s, f in zip(region["box"], seen * 2, frame * 2, strict=True)]
            expected = [v * s / d for v, s, d in zip(region["xyxy"], seen * 2, image.size * 2, strict=True)]
            tolerance = max(seen) / min(frame) + 1e-6  # one frame unit
            assert all(abs(a - b) <= tolerance for a, b in zip(in_seen, expected, strict=True)), region


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_in_the_familys_chat_template_with_answer_only_labels(name, family_sft):
    family = get_family(name)
    _, processor = tiny(name)
    _, samples = family_sft(name)
    samples = samples[:3]
    dataset = SftDataset(samples, processor)
    batch = Collator(processor)([dataset[i] for i in range(len(samples))])
    tokenizer = processor.tokenizer
    image_id = processor.image_token_id
    for row, (item, sample) in enumerate(zip(dataset.items, samples, strict=True)):
        ids = batch["input_ids"][row]
        real = batch["attention_mask"][row].bool()
        # the length batching relies on is the processor's own count, images included
        assert item.length == int(real.sum())
        assert family.assistant_header in item.text
        n_images = len(image_parts(sample))
        counts = processor._get_num_multimodal_tokens(image_sizes=_sizes(sample)).num_image_tokens
        assert len(counts) == n_images
        assert int((ids == image_id).sum()) > 0
        labels = batch["labels"][row]
        answer = tokenizer.decode(ids[labels != IGNORE_INDEX])
        assert answer == sample["messages"][-1]["content"] + family.turn_end
        assert not (labels[~real] != IGNORE_INDEX).any()
    if family.tile_size is None:  # Qwen's M-RoPE needs the image token types in the batch
        assert "mm_token_type_ids" in batch and "image_grid_thw" in batch


def _sizes(sample: dict) -> list[list[int]]:
    cache: dict = {}
    from defectvlm.train.data import load_part

    return [[image.height, image.width] for image in (load_part(p, cache) for p in image_parts(sample))]


def test_without_the_image_token_types_qwen_would_train_on_other_positions(family_sft):
    """Regression: the collator used to drop mm_token_type_ids, so Qwen2.5-VL fell back to 1-D
    positions for image tokens (and Qwen2-VL refused the batch)."""
    model, processor = tiny("qwen2_5_vl")
    _, samples = family_sft("qwen2_5_vl")
    dataset = SftDataset(samples[:1], processor)
    batch = Collator(processor)([dataset[0]])
    with torch.no_grad():
        with_types = model(**batch).logits
        batch.pop("mm_token_type_ids")
        model.model.rope_deltas = None
        without = model(**batch).logits
    assert not torch.allclose(with_types, without)


def test_data_path_refuses_a_processor_of_no_known_family():
    class OtherProcessor:
        pass

    with pytest.raises(ValueError, match="OtherProcessor is not the processor of a known model family"):
        family_of(OtherProcessor())


def test_attn_implementation_auto_picks_flash_attention_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(attention, "flash_attention_available", lambda: False)
    assert attention.resolve_attn_implementation("auto") == "sdpa"
    assert attention.resolve_attn_implementation("eager") == "eager"
    with pytest.raises(StepFailure, match="flash_attention_2 needs a CUDA GPU"):
        attention.resolve_attn_implementation("flash_attention_2")
    monkeypatch.setattr(attention, "flash_attention_available", lambda: True)
    assert attention.resolve_attn_implementation("auto") == "flash_attention_2"
    assert attention.resolve_attn_implementation("sdpa") == "sdpa"
