"""A phase-3-shaped adapter without training: the tiny model with LoRA on the LM and the top
two vision blocks, the top block unfrozen, every trainable weight moved by seeded noise (as
training would move it), saved by the training code's own save path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defectvlm.config import LoraParams, PhaseParams, params_from_dict
from defectvlm.data.sft import load_knowledge, load_templates
from defectvlm.io import read_jsonl
from defectvlm.models.families import get_family
from defectvlm.models.tiny_families import build_tiny_family
from defectvlm.train.artifacts import prompt_config, save_trained, trained_tensors
from defectvlm.train.phases import apply_phase
from tests.conftest import repo_params

FAMILY = get_family("qwen2_5_vl")
MIN_PIXELS, MAX_PIXELS = 3136, 200704
PHASE3 = PhaseParams(vision_lora_top_n=2, unfreeze_top_k=1)
THRESHOLD = 0.5


def trained_model(seed: int = 0, family: str = FAMILY.name):
    base, processor = build_tiny_family(family, MIN_PIXELS, MAX_PIXELS)
    model = apply_phase(base, get_family(family), PHASE3, LoraParams(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.eval()
    return model, processor


def save_adapter(
    model, processor, folder: Path, sft_dir: Path, family: str = FAMILY.name, regions_per_prompt: int = 0
) -> Path:
    sft = params_from_dict(repo_params()).sft  # what sft_dir was built with
    sft = sft.model_copy(update={"regions_per_prompt": regions_per_prompt})  # as if trained on runs of that many
    classes = json.loads((sft_dir / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    prompt = prompt_config(sft, load_templates(sft), load_knowledge(sft), classes, read_jsonl(sft_dir / "train.jsonl"))
    info = {
        "phase": 3,
        "enabled": True,
        "family": family,
        "base": "tiny-random",  # the in-memory model's random base
        "starts_from": None,
        "step": 1,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "phase_params": PHASE3.model_dump(),
        "lora": LoraParams(r=4, alpha=8, dropout=0.0).model_dump(),
    }
    state, modules = trained_tensors(model, get_family(family))
    save_trained(folder, model, state, modules, get_family(family), processor, info, prompt)
    (folder / "inference.json").write_text(json.dumps({"threshold": THRESHOLD, "classes": classes}), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sft_dir):
    """(the in-memory trained model, its processor, the saved adapter folder)."""
    model, processor = trained_model()
    folder = save_adapter(model, processor, tmp_path_factory.mktemp("adapter") / "best", sft_dir)
    return model, processor, folder


@pytest.fixture(scope="session")
def trained_one_region(tmp_path_factory, trained, sft_dir):
    """The same model saved as if trained with sft.regions_per_prompt: 1 (the demo's setting)."""
    model, processor, _ = trained
    return save_adapter(model, processor, tmp_path_factory.mktemp("adapter1") / "best", sft_dir, regions_per_prompt=1)
