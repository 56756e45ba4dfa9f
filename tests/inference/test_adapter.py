"""best/ is a standard, self-contained PEFT adapter: the plain PEFT load restores every trained
weight (projector, unfrozen vision block with its LoRA folded in, LM and vision LoRA)."""

from __future__ import annotations

import torch
from peft import PeftModel

from defectvlm import load_model
from defectvlm.config import LoraParams
from defectvlm.evaluate.scoring import score_samples
from defectvlm.io import read_jsonl
from defectvlm.models.tiny import build_tiny
from defectvlm.train.artifacts import load_trained
from defectvlm.train.phases import apply_phase
from tests.inference.conftest import FAMILY, MAX_PIXELS, MIN_PIXELS, PHASE3


def scores(model, processor, samples, classes) -> list[float]:
    return [row["score"] for row in score_samples(model, processor, samples, classes)]


def test_plain_peft_load_restores_every_trained_weight_and_equals_load_model(trained, sft_dir):
    model, processor, folder = trained
    samples = read_jsonl(sft_dir / "test.jsonl")[:4]
    classes = load_model(folder).config.classes
    expected = scores(model, processor, samples, classes)

    base, _ = build_tiny(MIN_PIXELS, MAX_PIXELS)
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    merged = plain.get_base_model()
    trained_projector = model.get_base_model().model.visual.merger.mlp[0].weight
    assert torch.equal(merged.model.visual.merger.modules_to_save["default"].mlp[0].weight, trained_projector)
    assert torch.allclose(torch.tensor(scores(plain, processor, samples, classes)), torch.tensor(expected), atol=1e-6)

    loaded = load_model(folder, device="cpu")
    assert loaded.config.threshold == 0.5 and loaded.config.family == "qwen2_5_vl"
    again = scores(loaded.model, loaded.processor, samples, classes)
    assert torch.allclose(torch.tensor(again), torch.tensor(expected), atol=1e-6)
    untrained = scores(build_tiny(MIN_PIXELS, MAX_PIXELS)[0], processor, samples, classes)
    assert max(abs(a - b) for a, b in zip(untrained, expected, strict=True)) > 1e-3  # the comparison can fail


def test_the_next_phase_loads_the_same_files_into_its_training_model(trained, sft_dir):
    model, processor, folder = trained
    base, _ = build_tiny(MIN_PIXELS, MAX_PIXELS)
    next_phase = apply_phase(base, FAMILY, PHASE3, LoraParams(r=4, alpha=8, dropout=0.0))
    counts = load_trained(next_phase, folder)
    assert counts["full_tensors"] > 0 and counts["lora_tensors"] > 0
    samples = read_jsonl(sft_dir / "test.jsonl")[:2]
    classes = load_model(folder).config.classes
    a = torch.tensor(scores(model, processor, samples, classes))
    b = torch.tensor(scores(next_phase.eval(), processor, samples, classes))
    assert torch.allclose(a, b, atol=1e-6)
