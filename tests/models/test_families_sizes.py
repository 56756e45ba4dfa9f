"""Real sizes, no weights: the published 7B/8B configurations on the meta device, per phase."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import transformers

from defectvlm.models.families import get_family
from defectvlm.models.sizes import PUBLISHED, build_on_meta, markdown_table, phase_counts
from defectvlm.models.tiny_families import published_random
from tests.conftest import REPO

pytestmark = pytest.mark.slow
# the parameter counts the model cards publish
PUBLISHED_TOTALS = {
    "qwen2_vl": 8_291_375_616,
    "qwen2_5_vl": 8_292_166_656,
    "qwen3_vl": 8_767_123_696,
    "internvl": 7_944_373_760,
}

# linears per vision block: qkv + proj and the MLP (Qwen2.5-VL's is gated); InternViT's q, k, v apart
VISION_LINEARS = {"qwen2_vl": 4, "qwen2_5_vl": 5, "qwen3_vl": 4, "internvl": 6}


@functools.cache
def counts(name: str) -> list[dict]:
    return phase_counts(name)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_architecture_per_phase(name):
    family = get_family(name)
    model = build_on_meta(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_TOTALS[name]
    blocks = model.get_submodule(family.vision_blocks)
    layers = model.get_submodule(family.language_layers)
    lm_leaves = {n for n, _ in layers[0].named_modules() if re.fullmatch(family.lm_lora_leaves, n)}
    vision_leaves = {n for n, _ in blocks[0].named_modules() if re.fullmatch(family.vision_lora_leaves, n)}
    assert len(lm_leaves) == 7  # attention q/k/v/o, MLP gate/up/down
    assert len(vision_leaves) == VISION_LINEARS[name]  # every linear of a vision block
    projector = sum(p.numel() for path in family.projectors for p in model.get_submodule(path).parameters())
    top_block = sum(p.numel() for p in blocks[-1].parameters())
    phase1, phase2, phase3 = counts(name)
    for row in (phase1, phase2, phase3):
        assert row["vision_frozen"] and row["projector"] == projector and row["lm_lora"] > 0
        lm = {m for m in row["lora_modules"] if m.startswith("base_model.model." + family.language_layers)}
        assert len(lm) == len(layers) * len(lm_leaves)
    assert phase1["vision_lora"] == 0 and phase1["vision_blocks"] == 0
    assert len(phase1["lora_modules"]) == len(layers) * len(lm_leaves)  # no LoRA in the vision tower
    vision_lora = {m for m in phase2["lora_modules"] if family.vision_blocks in m}
    top2 = {len(blocks) - 2, len(blocks) - 1}
    assert {int(m.split(family.vision_blocks + ".")[1].split(".")[0]) for m in vision_lora} == top2
    assert len(vision_lora) == 2 * len(vision_leaves) and phase2["vision_blocks"] == 0
    assert phase3["vision_lora"] == phase2["vision_lora"] > 0
    assert phase3["vision_blocks"] == top_block  # exactly the top block trains in full


def test_docs_table_is_the_scripts_output():
    """docs/training.md ("Model families") shows the table `python -m defectvlm.models.sizes` prints."""
    assert markdown_table() in (REPO / "docs" / "training.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_random_is_the_published_architecture_speaking_the_processors_tokens(name):
    """What bench_train_gpu.py writes as a checkpoint: published sizes, the tiny processor's ids."""
    config, processor = published_random(name, 56 * 56, 1344 * 1024)
    with torch.device("meta"):
        model = getattr(transformers, get_family(name).model_class)(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_TOTALS[name]
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token) != tokenizer.unk_token_id
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) <= config.text_config.vocab_size
