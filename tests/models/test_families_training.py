"""Every family through phases 1-3 and the scoring pass (tiny, random, a few steps each)."""

from __future__ import annotations

import json

import pytest

from defectvlm.config import params_from_dict
from defectvlm.evaluate.scoring import score_samples
from defectvlm.io import read_jsonl
from defectvlm.models.families import get_family
from defectvlm.train.data import Collator, SftDataset, image_parts
from defectvlm.train.phases import apply_phase, check_invariants, classify
from tests.models.conftest import FAMILIES, tiny
from tests.train.phase_moves import expected_groups, moved_groups, steps_move

pytestmark = pytest.mark.slow
TRAIN = params_from_dict({}).train


def few_image_samples(samples: list[dict], n: int = 2) -> list[dict]:
    return sorted(samples, key=lambda s: (len(image_parts(s)), s["id"]))[:n]


@pytest.mark.parametrize("name", FAMILIES)
def test_three_phases_train_exactly_their_parameters(name, family_sft):
    family = get_family(name)
    base, processor = tiny(name)
    samples = few_image_samples(family_sft(name)[1])
    dataset = SftDataset(samples, processor)
    batch = Collator(processor)([dataset[i] for i in range(len(samples))])
    initial = {k: v.detach().clone() for k, v in base.state_dict().items()}
    n_blocks = len(base.get_submodule(family.vision_blocks))
    for number in (1, 2, 3):
        base.load_state_dict(initial)
        phase = TRAIN.phase(number)
        model = apply_phase(base, family, phase, TRAIN.lora)
        check_invariants(model, family, number, phase)
        changed, trainable = steps_move(model, family, phase, batch, steps=2)
        assert changed == trainable
        assert moved_groups(changed, family) == expected_groups(phase)
        infos = [classify(n, family) for n in changed]
        top = set(range(n_blocks - max(phase.vision_lora_top_n, phase.unfreeze_top_k), n_blocks))
        assert {i.block for i in infos if i.group == "vision_blocks"} <= top
        for projector in family.projectors:  # every projector module trains (Qwen3-VL: deepstack too)
            assert any(n.removeprefix("base_model.model.").startswith(projector + ".") for n in changed), projector
        model.unload()
    base.load_state_dict(initial)  # the cached tiny model leaves as it came


@pytest.mark.parametrize("name", FAMILIES)
def test_the_scoring_pass_runs_on_every_family(name, family_sft):
    model, processor = tiny(name)
    sft, _ = family_sft(name)
    classes = json.loads((sft / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    chosen = few_image_samples(read_jsonl(sft / "val.jsonl"))
    rows = score_samples(model, processor, chosen, classes, batch_size=2)
    assert len(rows) == sum(len(s["meta"]["regions"]) for s in chosen)
    alone = score_samples(model, processor, chosen, classes, batch_size=1)  # two images: only the system prompt shared
    for mine, theirs in zip(rows, alone, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
    assert all(0 <= row["score"] <= 1 for row in rows)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_about_one_image_share_its_prefix_and_score_as_alone(name, family_sft):
    """Predict's chunks of one image (same system prompt and whole image) in one batch: the
    prefix is shared, and the scores are those of one sample per batch (nothing shared)."""
    from defectvlm.evaluate.shared_prefix import collate_shared
    from tests.evaluate.test_shared_prefix import chunk_samples
    from tests.models.conftest import MAX_PIXELS, MIN_PIXELS

    model, processor = tiny(name)
    sft, _ = family_sft(name)
    classes = json.loads((sft / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    labelled = [[("normal", None), ("abnormal", classes[0])], [("normal", None)] * 3]
    samples = chunk_samples(sft, labelled, True, name, (MIN_PIXELS, MAX_PIXELS))
    dataset = SftDataset(samples, processor)
    _, shared = collate_shared(processor, Collator(processor), [dataset[0], dataset[1]])
    assert shared is not None and shared.group == [0, 0]
    together = score_samples(model, processor, samples, classes, batch_size=2)
    alone = score_samples(model, processor, samples, classes, batch_size=1)
    assert len(together) == 5 and all(row["class_probs"] for row in together)
    for mine, theirs in zip(together, alone, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert mine["class_probs"] == pytest.approx(theirs["class_probs"], abs=1e-5)
