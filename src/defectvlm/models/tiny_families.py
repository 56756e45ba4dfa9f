"""`tiny-random` for every family: the family's real transformers model and processor classes
at a tiny size, random weights, its chat template, built offline from fixed seeds.

The tokenizer is the tiny model's (`defectvlm.models.tiny`), plus the family's own image
tokens; the image processors carry the family's published preprocessing (patch size, merge
size, normalisation, InternVL's 448 px tiles), so boxes, frames and image token counts are
those of the real checkpoints. Qwen2.5-VL is `defectvlm.models.tiny` itself.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from defectvlm.models.families import Family, get_family
from defectvlm.models.tiny import QWEN2_SYSTEM, QWEN_IMAGE, SEED, TINY_TEXT, build_tokenizer, chat_template

CHAT_TEMPLATES = {
    "qwen2_vl": chat_template(QWEN_IMAGE, QWEN2_SYSTEM),
    "qwen3_vl": chat_template(QWEN_IMAGE, first_system_only=True),
    "internvl": chat_template("<IMG_CONTEXT>\n"),  # InternVL3-*-hf: no default system prompt
}
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
HALF_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
IMAGENET_NORM = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

_QWEN_VISION = {"depth": 4, "num_heads": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
_LM_TEXT = {k: v for k, v in TINY_TEXT.items() if k != "rope_parameters"}
INTERNVL_TILE_TOKENS = (448 // 14) ** 2 // 4  # tokens per tile after the 0.5 pixel shuffle: 256


def _qwen_ids(tokenizer) -> dict:
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    image, video, start, end = (tokenizer.convert_tokens_to_ids(n) for n in names)
    return {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }


def _text_ids(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _qwen2_vl(tokenizer, family: Family, budget: dict):
    config = transformers.Qwen2VLConfig(
        text_config={**TINY_TEXT, **_text_ids(tokenizer)},
        vision_config={**_QWEN_VISION, "embed_dim": 64, "mlp_ratio": 2, "hidden_size": 128, "patch_size": 14},
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=family.patch_size, merge_size=family.merge_size, **CLIP_NORM, **budget
    )
    processor = transformers.Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATES["qwen2_vl"],
    )
    return config, processor


def _qwen3_vl(tokenizer, family: Family, budget: dict):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6], "mrope_interleaved": True}
    config = transformers.Qwen3VLConfig(
        text_config={**_LM_TEXT, "head_dim": 32, "rope_parameters": rope, **_text_ids(tokenizer)},
        vision_config={
            **_QWEN_VISION,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 128,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1, 2],
        },
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=family.patch_size, merge_size=family.merge_size, **HALF_NORM, **budget
    )
    processor = transformers.Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATES["qwen3_vl"],
    )
    return config, processor


def _internvl(tokenizer, family: Family, budget: dict):
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(INTERNVL_TOKENS.values())}, replace_extra_special_tokens=False
    )
    # named image tokens (tokenizer.start_image_token, ..._id), as InternVL's tokenizer_config has them
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        extra_special_tokens=INTERNVL_TOKENS,
    )
    config = transformers.InternVLConfig(
        text_config={
            **_LM_TEXT,
            "model_type": "qwen2",
            "rope_parameters": {"rope_type": "default"},
            **_text_ids(tokenizer),
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": [family.tile_size, family.tile_size],
            "patch_size": [family.patch_size, family.patch_size],
        },
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=INTERNVL_TILE_TOKENS,
        downsample_ratio=1 / family.merge_size,
        tie_word_embeddings=False,
    )
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": family.tile_size, "width": family.tile_size}, **IMAGENET_NORM, **budget
    )
    processor = transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(),
        image_seq_length=INTERNVL_TILE_TOKENS,
        chat_template=CHAT_TEMPLATES["internvl"],
    )
    return config, processor


_BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl, "internvl": _internvl}


def build_tiny_family(name: str, min_pixels: int, max_pixels: int, attn_implementation: str = "sdpa"):
    """(model, processor): the family's tiny random model (same weights every time)."""
    family = get_family(name)
    if name == "qwen2_5_vl":
        from defectvlm.models.tiny import build_tiny

        return build_tiny(min_pixels, max_pixels)
    tokenizer = build_tokenizer()
    config, processor = _BUILDERS[name](tokenizer, family, family.processor_kwargs(min_pixels, max_pixels))
    processor.tokenizer.chat_template = processor.chat_template
    config._attn_implementation = attn_implementation
    model_class = getattr(transformers, family.model_class)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, processor


def published_random(name: str, min_pixels: int, max_pixels: int):
    """(config, processor): the family's published 7B/8B architecture (`defectvlm.models.sizes`)
    with the tiny tokenizer's special-token ids, and the tiny processor: what a checkpoint of
    the real size looks like at random weights (the GPU benchmark writes one and trains it)."""
    from defectvlm.models.sizes import PUBLISHED

    family = get_family(name)
    if name == "qwen2_5_vl":
        from defectvlm.models.tiny import build_processor, tiny_config

        processor = build_processor(min_pixels, max_pixels)
        tiny = tiny_config(processor.tokenizer)
    else:
        tiny, processor = _BUILDERS[name](build_tokenizer(), family, family.processor_kwargs(min_pixels, max_pixels))
        processor.tokenizer.chat_template = processor.chat_template
    config = getattr(transformers, family.model_class).config_class(**PUBLISHED[name][1])
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if hasattr(tiny, key):
            setattr(config, key, getattr(tiny, key))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tiny.text_config, key))
    config.use_cache = config.text_config.use_cache = False
    return config, processor
