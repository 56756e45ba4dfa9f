"""A tiny Qwen2.5-VL built offline: a byte-level BPE tokenizer trained on the project's own
templates and the real Qwen2.5-VL processor classes around it, with either random weights
(`tiny` / `tiny-random`, `build_tiny`) or weights pretrained on a generic image-text corpus
(`tiny-pretrained`, `load_pretrained_tiny`: the files `python -m defectvlm.models.pretrain_tiny`
writes into the package, models/tiny_pretrained/; see docs/evaluation.md, "Learning proof").

Everything is derived from fixed seeds and files in the package, so both are the same model
on every machine. Small enough to train on 2 CPU cores.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from defectvlm.errors import StepFailure

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 2048
SEED = 1234

# The families' published chat templates, compact (no tools, videos or vision ids): ChatML
# turns, the family's image placeholder, the default system prompt where the published template
# adds one when the conversation opens without a system message, and Qwen3-VL's rule that only
# a first system message is rendered. tests/models/test_chat_templates.py checks the rendering
# against the published templates' output for every message shape the project produces.
_CHATML_TURN = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
)


def chat_template(image_placeholder: str, default_system: str | None = None, first_system_only: bool = False) -> str:
    """A compact chat template (see above) with the family's image placeholder."""
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "{% endif %}"
        if default_system
        else ""
    )
    turn = _CHATML_TURN.replace("IMAGE_PLACEHOLDER", image_placeholder)
    if first_system_only:
        turn = "{% if message['role'] != 'system' or loop.first %}" + turn + "{% endif %}"
    generation = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    return "{% for message in messages %}" + system + turn + "{% endfor %}" + generation


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN2_SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = chat_template(QWEN_IMAGE, QWEN2_SYSTEM)  # Qwen2.5-VL's, as Qwen2-VL's

TINY_TEXT = {
    # Wider than transformers' 0.02: with a frozen random LM head behind a unit-RMS norm,
    # 0.02 caps every logit near 2.5, so even a perfect adapter could not be confident.
    "initializer_range": 0.1,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
TINY_VISION = {
    "depth": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "out_hidden_size": 128,
    "fullatt_block_indexes": [1, 3],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the templates, glossary and numbers."""
    templates = resources.files("defectvlm.data").joinpath("templates")
    texts = [templates.joinpath(name).read_text("utf-8") for name in ("zh.yaml", "en.yaml", "knowledge.yaml")]
    texts += [f"R{i}: [{i * 7}, {i * 13}, {i * 7 + 40}, {i * 13 + 25}]" for i in range(1, 40)]
    texts += [" ".join(str(n) for n in range(k, k + 100)) for k in range(0, 1100, 100)]
    texts += ["R1: normal\nR2: abnormal | slag\nR3: abnormal | streak\nR4: abnormal | over_melt\n"] * 20
    return texts


PRETRAINED = resources.files("defectvlm.models").joinpath("tiny_pretrained")
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RECIPE_KEY = "defectvlm_recipe"  # the one metadata entry of the weights file: JSON, see pretrain_tiny


def build_tokenizer() -> PreTrainedTokenizerFast:
    return _wrap_tokenizer(train_tokenizer_core())


def train_tokenizer_core() -> Tokenizer:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return core


def _wrap_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(
    min_pixels: int, max_pixels: int, tokenizer: PreTrainedTokenizerFast | None = None
) -> Qwen2_5_VLProcessor:
    tokenizer = tokenizer or build_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            **TINY_TEXT,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=TINY_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny(min_pixels: int, max_pixels: int) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """The tiny model (same weights every time) and its processor."""
    processor = build_processor(min_pixels, max_pixels)
    config = tiny_config(processor.tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model, processor


def pretrained_recipe(folder: Path | None = None) -> dict:
    """How pretrained weights were made: the pretraining script's arguments and corpus digest."""
    from safetensors import safe_open

    with safe_open(str(_pretrained_file(folder, WEIGHTS_FILE)), "pt") as weights:
        return json.loads(weights.metadata()[RECIPE_KEY])


def load_pretrained_tiny(
    min_pixels: int, max_pixels: int, folder: Path | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """The tiny model with pretrained weights (default: the package's) and the tokenizer they were trained with."""
    from safetensors.torch import load

    core = Tokenizer.from_str(_pretrained_file(folder, TOKENIZER_FILE).read_text("utf-8"))
    processor = build_processor(min_pixels, max_pixels, _wrap_tokenizer(core))
    generator_state = torch.random.get_rng_state()  # the random init below is overwritten: leave no trace
    try:
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(processor.tokenizer))
    finally:
        torch.random.set_rng_state(generator_state)
    # read through Python (not safetensors' mmap): DVC's dependency check records the file as read
    model.load_state_dict(load(_pretrained_file(folder, WEIGHTS_FILE).read_bytes()), strict=True)
    model.eval()
    return model, processor


def _pretrained_file(folder: Path | None, name: str) -> Path:
    path = Path(str(PRETRAINED)) / name if folder is None else folder / name
    if not path.is_file():
        command = "python -m defectvlm.models.pretrain_tiny"
        raise StepFailure(f"no pretrained tiny weights at {path}; make them with `{command}`")
    return path
