"""Phases without DeepSpeed: the trainable set, the invariants, and which tensors a step moves."""

import pytest

from defectvlm.config import PhaseParams, params_from_dict
from defectvlm.io import read_jsonl
from defectvlm.models.families import get_family
from defectvlm.models.tiny import build_tiny
from defectvlm.train.data import IGNORE_INDEX, Collator, SftDataset, batches
from defectvlm.train.phases import (
    PhaseInvariantError,
    apply_phase,
    canonical,
    check_invariants,
    classify,
    lora_targets,
    param_groups,
)
from tests.train.phase_moves import expected_groups, moved_groups, steps_move

FAMILY = get_family("qwen2_5_vl")
PHASES = params_from_dict({}).train


def tiny_batch(sft_dir, processor, n=2):
    samples = read_jsonl(sft_dir / "train.jsonl")[:n]
    dataset = SftDataset(samples, processor)
    return Collator(processor)([dataset[i] for i in range(n)]), samples


@pytest.mark.parametrize("number", [1, 2, 3])
def test_a_few_steps_move_exactly_the_phase_parameters(sft_dir, number):
    phase = PHASES.phase(number)
    base, processor = build_tiny(3136, 200704)
    model = apply_phase(base, FAMILY, phase, PHASES.lora)
    check_invariants(model, FAMILY, number, phase)
    batch, _ = tiny_batch(sft_dir, processor)
    changed, trainable = steps_move(model, FAMILY, phase, batch, steps=3)
    assert changed == trainable
    assert moved_groups(changed, FAMILY) == expected_groups(phase)
    blocks = {classify(n, FAMILY).block for n in changed if classify(n, FAMILY).group == "vision_blocks"}
    assert blocks <= {2, 3}  # the tiny model has 4 vision blocks; only the top ones move


def test_lora_targets_are_anchored_to_the_language_model():
    base, _ = build_tiny(3136, 200704)
    model = apply_phase(base, FAMILY, PHASES.phase1, PHASES.lora)
    lora_modules = {canonical(n).rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert lora_modules and all(m.startswith("model.language_model.layers.") for m in lora_modules)
    assert any(m.endswith("mlp.gate_proj") for m in lora_modules)  # same leaf names as the vision MLP
    assert "model.visual" not in lora_targets(FAMILY, 4, 0)


def test_invariants_catch_a_wrongly_trainable_part():
    base, _ = build_tiny(3136, 200704)
    model = apply_phase(base, FAMILY, PHASES.phase1, PHASES.lora)
    patch = next(p for n, p in model.named_parameters() if "patch_embed" in n)
    patch.requires_grad_(True)
    with pytest.raises(PhaseInvariantError, match="patch_embed"):
        check_invariants(model, FAMILY, 1, PHASES.phase1)
    with pytest.raises(PhaseInvariantError, match="no group"):
        param_groups(model, FAMILY, PHASES.phase1)
    patch.requires_grad_(False)
    block = next(p for n, p in model.named_parameters() if "visual.blocks.3.attn.qkv.weight" in n)
    block.requires_grad_(True)
    with pytest.raises(PhaseInvariantError, match="unfrozen vision blocks"):
        check_invariants(model, FAMILY, 1, PHASES.phase1)


def test_phase_asking_for_more_blocks_than_the_model_has():
    base, _ = build_tiny(3136, 200704)
    with pytest.raises(PhaseInvariantError, match="4 vision blocks"):
        apply_phase(base, FAMILY, PhaseParams(vision_lora_top_n=9), PHASES.lora)


def test_labels_cover_only_the_assistant_answer(sft_dir):
    _, processor = build_tiny(3136, 200704)
    batch, samples = tiny_batch(sft_dir, processor)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, sample in enumerate(samples):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = ids[labels != IGNORE_INDEX]
        assert tokenizer.decode(kept) == sample["messages"][2]["content"] + "<|im_end|>"
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        assert (labels[batch["attention_mask"][row] == 0] == IGNORE_INDEX).all()


def test_length_grouping_keeps_padding_low_and_covers_every_sample():
    lengths = [100 + (i * 37) % 400 for i in range(200)]
    for grouped in (False, True):
        order = batches(lengths, 4, seed=1, epoch=0, group_by_length=grouped)
        assert sorted(i for b in order for i in b) == list(range(200))

    def efficiency(order):
        return sum(lengths[i] for b in order for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in order)

    assert efficiency(batches(lengths, 4, 1, 0, True)) > 0.95 > efficiency(batches(lengths, 4, 1, 0, False))
    assert batches(lengths, 4, 1, 0, True) == batches(lengths, 4, 1, 0, True) != batches(lengths, 4, 1, 1, True)


def test_gradient_checkpointing_leaves_the_frozen_vision_tower_out_of_backward(sft_dir, tmp_path):
    from defectvlm.train.build import build_model

    params = params_from_dict({"train": {"gradient_checkpointing": True, "output_dir": str(tmp_path)}})
    model, processor, family, _ = build_model(params, 1, params.train.phase1)
    patch_embed = model.get_base_model().get_submodule(family.vision_tower).get_input_embeddings()
    assert not patch_embed._forward_hooks
    batch, _ = tiny_batch(sft_dir, processor)
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".visual.blocks." in n)
    assert any(p.grad is not None for n, p in model.named_parameters() if ".lora_" in n)


def test_region_crops_are_extra_images_and_stay_out_of_the_loss(sft_dir, tmp_path):
    from defectvlm.config import SftParams
    from defectvlm.data.sft import build_sft, load_knowledge, load_templates

    params = SftParams(region_encoding="coords+crops")
    regions = {s: read_jsonl(sft_dir.parent / "03" / f"{s}.jsonl") for s in ("train", "val", "test")}
    samples = build_sft(regions, params, load_templates(params), load_knowledge(params)).splits["val"][:2]
    _, processor = build_tiny(3136, 200704)
    dataset = SftDataset(samples, processor)
    batch = Collator(processor)([dataset[0], dataset[1]])
    n_images = sum(1 + len(s["meta"]["regions"]) for s in samples)
    assert batch["image_grid_thw"].shape[0] == n_images
    assert [item.length for item in dataset.items] == batch["attention_mask"].sum(dim=1).tolist()
    kept = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(kept) == samples[0]["messages"][2]["content"] + "<|im_end|>"
