"""Prompts about one image share its prefix (system prompt + whole image) in the scoring pass,
prompts about different images their system prompt: the batch is the plain collator's, and the
scores are the slow reference's."""

from __future__ import annotations

import pytest

from defectvlm.config import params_from_dict
from defectvlm.data.images import load_upright
from defectvlm.data.sft import load_knowledge, load_templates
from defectvlm.evaluate.scoring import score_samples
from defectvlm.evaluate.shared_prefix import collate_shared
from defectvlm.inference.predict import region_prompt_sample
from defectvlm.io import read_jsonl
from defectvlm.models.tiny import build_tiny
from defectvlm.train.artifacts import prompt_config
from defectvlm.train.data import Collator, SftDataset
from tests.conftest import read_json, repo_params
from tests.evaluate.test_scoring import slow_reference

MIN_PIXELS, MAX_PIXELS = 3136, 200704


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(MIN_PIXELS, MAX_PIXELS)


def chunk_samples(
    sft_dir,
    labelled: list[list[tuple[str, str | None]]],
    class_answers: bool = False,
    family: str = "qwen2_5_vl",
    pixels: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS),
) -> list[dict]:
    """Predict's samples for one test image: one chunk of boxes per entry of `labelled` (its
    regions' labels), built by predict's own prompt builder in the frame of `family`."""
    sft = params_from_dict(repo_params()).sft  # what sft_dir was built with
    classes = read_json(sft_dir / "sft_summary.json")["classes"]
    prompt = prompt_config(sft, load_templates(sft), load_knowledge(sft), classes, read_jsonl(sft_dir / "train.jsonl"))
    path = read_jsonl(sft_dir / "test.jsonl")[0]["images"][0]
    width, height = load_upright(path).size
    samples = []
    for number, labels in enumerate(labelled):
        boxes = [(10 + 40 * k, 5 + 30 * number, 60 + 40 * k, 45 + 30 * number) for k in range(len(labels))]

        def build(chosen, name=f"chunk{number}", boxes=boxes):
            return region_prompt_sample(name, path, width, height, boxes, chosen, prompt, family, *pixels)

        sample = build(labels)
        if class_answers:
            sample["meta"]["class_answers"] = {
                f"R{k + 1}": build([*labels[:k], ("abnormal", classes[-1]), *labels[k + 1 :]])["messages"][2]["content"]
                for k, (label, _) in enumerate(labels)
                if label == "normal"
            }
        samples.append(sample)
    return samples


def alone_abnormal(sample: dict, rid: str, cls: str) -> dict:
    """The sample answered with its `class_answers` line for `rid` (that region abnormal)."""
    answer = {"role": "assistant", "content": sample["meta"]["class_answers"][rid]}
    regions = [{**r, "label": "abnormal", "cls": cls} if r["rid"] == rid else r for r in sample["meta"]["regions"]]
    return {**sample, "messages": [*sample["messages"][:2], answer], "meta": {**sample["meta"], "regions": regions}}


def test_the_shared_batch_is_the_plain_collators(tiny, sft_dir):
    processor = tiny[1]
    samples = chunk_samples(sft_dir, [[("normal", None)] * 3, [("abnormal", "slag"), ("normal", None)]])
    dataset = SftDataset(samples, processor)
    items = [dataset[0], dataset[1]]
    collate = Collator(processor)
    plain = collate(items)
    batch, shared = collate_shared(processor, collate, items)
    assert shared is not None and shared.group == [0, 0]
    assert shared.lengths[0] == shared.lengths[1] < int(batch["attention_mask"][1].sum())
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "labels"):
        assert batch[key].tolist() == plain[key].tolist(), key
    prefix_and_rest = [shared.prefix_pixels["pixel_values"], shared.rest_pixels["pixel_values"]]
    assert sum(len(p) for p in prefix_and_rest) < len(plain["pixel_values"])  # the whole image once, not twice

    other = read_jsonl(sft_dir / "val.jsonl")[
        :2
    ]  # two images: the system prompt is shared, every image goes with the rest
    items = [SftDataset(other, processor)[i] for i in range(2)]
    plain = collate(items)
    batch, shared = collate_shared(processor, collate, items)
    assert shared is not None and shared.group == [0, 0] and not shared.prefix_pixels
    assert processor.image_token not in processor.tokenizer.decode(batch["input_ids"][0][: shared.lengths[0]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "labels"):
        assert batch[key].tolist() == plain[key].tolist(), key
    assert shared.rest_pixels["pixel_values"].tolist() == plain["pixel_values"].tolist()

    items = [SftDataset(other[:1], processor)[0]]  # one item: nothing to share
    batch, shared = collate_shared(processor, collate, items)
    assert shared is None and batch["input_ids"].tolist() == collate(items)["input_ids"].tolist()


def test_different_images_share_their_system_prompt_and_score_as_the_slow_reference(tiny, sft_dir):
    """A batch of different images (a service's batch, evaluation): the prefix is the system
    prompt alone; scores and class probabilities are those of one forward per sample."""
    model, processor = tiny
    classes = read_json(sft_dir / "sft_summary.json")["classes"]
    samples = read_jsonl(sft_dir / "val.jsonl")[:3]
    assert len({s["image_id"] for s in samples}) == 3
    rows = score_samples(model, processor, samples, classes, batch_size=3)
    assert len(rows) == sum(len(s["meta"]["regions"]) for s in samples)
    for sample in samples:
        reference = slow_reference(model, processor, sample, classes)
        for row in (r for r in rows if r["image_id"] == sample["image_id"]):
            assert row["score"] == pytest.approx(reference[row["rid"]]["score"], abs=1e-5), (sample["id"], row["rid"])
            if row["truth"] == "abnormal":
                assert row["class_probs"] == pytest.approx(reference[row["rid"]]["class_probs"], abs=1e-5)


def test_chunks_of_one_image_score_as_the_slow_reference(tiny, sft_dir):
    """Labels and classes of the chunks' own answers, and the classes of their normal regions
    from `class_answers` (each such region's abnormal line), in batches that share the prefix."""
    model, processor = tiny
    classes = read_json(sft_dir / "sft_summary.json")["classes"]
    labelled = [
        [("normal", None), ("abnormal", "slag"), ("normal", None)],
        [("abnormal", "over_melt"), ("normal", None)],
        [("normal", None)] * 2,
    ]
    samples = chunk_samples(sft_dir, labelled, class_answers=True)
    rows = score_samples(model, processor, samples, classes, batch_size=3)
    assert len(rows) == 7
    for sample in samples:
        reference = slow_reference(model, processor, sample, classes)
        for row in (r for r in rows if r["image_id"] == sample["image_id"]):
            expected = reference[row["rid"]]
            assert row["score"] == pytest.approx(expected["score"], abs=1e-5), (sample["id"], row["rid"])
            if row["truth"] == "abnormal":
                assert row["class_probs"] == pytest.approx(expected["class_probs"], abs=1e-5)
            else:  # its class from the answer where it alone is abnormal
                by_class = slow_reference(model, processor, alone_abnormal(sample, row["rid"], classes[-1]), classes)
                assert row["class_probs"] == pytest.approx(by_class[row["rid"]]["class_probs"], abs=1e-5)
    unshared = score_samples(model, processor, samples, classes, batch_size=1)  # one sample per batch: no sharing
    for mine, theirs in zip(rows, unshared, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
        assert mine["class_probs"] == pytest.approx(theirs["class_probs"], abs=2e-6)  # both rounded to 1e-6
