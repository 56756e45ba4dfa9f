from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from defectvlm.config import ModelParams
from defectvlm.data.demo.items import CANONICAL_CLASSES
from defectvlm.errors import StepFailure
from defectvlm.models import generic_corpus, pretrain_tiny, tiny
from defectvlm.models.loading import load_base

SHORT_RUN = ["--items", "6", "--steps", "2", "--batch-size", "2", "--seed", "3"]


def recipe_of(path: Path) -> dict:
    with safe_open(str(path), "pt") as weights:
        return json.loads(weights.metadata()[tiny.RECIPE_KEY])


def test_same_arguments_give_the_same_bytes_and_record_them(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert pretrain_tiny.main([*SHORT_RUN, "--out", str(tmp_path / name)]) == 0
    for file in (tiny.WEIGHTS_FILE, tiny.TOKENIZER_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file

    recipe = recipe_of(tmp_path / "a" / tiny.WEIGHTS_FILE)
    args = vars(pretrain_tiny.parse_args(SHORT_RUN))
    assert {k: v for k, v in recipe.items() if k != "corpus_sha256"} == {k: args[k] for k in pretrain_tiny.DEFAULTS}
    with tempfile.TemporaryDirectory() as folder:
        _, digest = pretrain_tiny.build_corpus(3, 6, Path(folder))
    assert recipe["corpus_sha256"] == digest


def test_training_changes_the_weights(tmp_path: Path) -> None:
    pretrain_tiny.main([*SHORT_RUN, "--out", str(tmp_path)])
    random_model, _ = tiny.build_tiny(3136, 200704)
    with safe_open(str(tmp_path / tiny.WEIGHTS_FILE), "pt") as weights:
        changed = [k for k in weights.keys() if not torch.equal(weights.get_tensor(k), random_model.state_dict()[k])]
    assert any(k.startswith("model.visual.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    # fine-tuning keeps the embeddings and the head frozen: pretraining leaves tiny-random's
    assert not [k for k in changed if k.startswith(pretrain_tiny.FROZEN)]


def test_corpus_is_generic_and_uses_the_sft_region_frame(tmp_path: Path) -> None:
    samples, _ = pretrain_tiny.build_corpus(0, 40, tmp_path)
    text = json.dumps(samples, ensure_ascii=False).lower()
    for word in (*CANONICAL_CLASSES, "powder", "defect", "abnormal", 'normal"', "铺粉", "缺陷"):
        assert word not in text, word
    listed = [s for s in samples if s["task"] == "list"]
    assert listed
    for sample in listed:
        user = sample["messages"][1]["content"]
        crops = [part for part in user if part["type"] == "image" and "crop" in part]
        lines = sample["messages"][2]["content"].split("\n")
        assert len(crops) == len(lines) >= 1
        assert user[1]["text"].endswith("<regions>\n") and user[-1]["text"] == "\n</regions>"
        things = sample["meta"]["things"]
        assert lines == [generic_corpus.region_answer(f"R{k}", t) for k, t in enumerate(things, start=1)]
        assert all(t in (*generic_corpus.THINGS, generic_corpus.NOTHING) for t in things)
    answers = {line.split(": ", 1)[1] for s in listed for line in s["messages"][2]["content"].split("\n")}
    assert generic_corpus.PLAIN in answers and any(a.startswith(generic_corpus.MARKED + " | ") for a in answers)


def test_recall_items_are_text_only_and_answer_each_region_from_its_note() -> None:
    for index in range(20):
        sample = generic_corpus.build_recall_item(0, index)
        user = sample["messages"][1]["content"]
        assert [part["type"] for part in user] == ["text"]
        notes = [line.rsplit("] ", 1)[1] for line in user[0]["text"].split("\n") if line.startswith("R")]
        answers = sample["messages"][2]["content"].split("\n")
        assert len(notes) == len(answers) == len(sample["meta"]["things"]) >= 1
        for k, (note, answer, thing) in enumerate(zip(notes, answers, sample["meta"]["things"], strict=True), start=1):
            assert note == generic_corpus.SYNONYMS[thing] and answer == generic_corpus.region_answer(f"R{k}", thing)
    assert len(generic_corpus.build_recall_item(0, 5, single=True)["meta"]["things"]) == 1


def test_pretrained_weights_load_tiny_is_the_shipped_base_and_tiny_random_the_random_one(tmp_path: Path) -> None:
    pretrain_tiny.main([*SHORT_RUN, "--out", str(tmp_path)])
    pretrained, processor = tiny.load_pretrained_tiny(3136, 200704, folder=tmp_path)
    with safe_open(str(tmp_path / tiny.WEIGHTS_FILE), "pt") as weights:
        assert all(torch.equal(weights.get_tensor(k), v) for k, v in pretrained.state_dict().items())
    assert tiny.pretrained_recipe(tmp_path)["seed"] == 3

    built, built_processor = tiny.build_tiny(ModelParams().min_pixels, ModelParams().max_pixels)
    random_model, _ = load_base(ModelParams(name_or_path="tiny-random"))
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in random_model.state_dict().items())
    with safe_open(str(Path(str(tiny.PRETRAINED)) / tiny.WEIGHTS_FILE), "pt") as shipped:
        for name in ("tiny", "tiny-pretrained"):
            model, _ = load_base(ModelParams(name_or_path=name))
            assert all(torch.equal(shipped.get_tensor(k), v) for k, v in model.state_dict().items()), name
    assert any(not torch.equal(v, built.state_dict()[k]) for k, v in model.state_dict().items())
    # the SFT prompts tokenize exactly as with the tokenizer built from the templates
    assert processor.tokenizer.get_vocab() == built_processor.tokenizer.get_vocab()


def test_missing_pretrained_weights_name_the_command_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(StepFailure, match="python -m defectvlm.models.pretrain_tiny"):
        tiny.load_pretrained_tiny(3136, 200704, folder=tmp_path)


def test_the_curriculum_starts_with_single_region_items(tmp_path: Path) -> None:
    samples, _ = pretrain_tiny.build_corpus(0, 40, tmp_path)
    _, processor = tiny.build_tiny(generic_corpus.MIN_PIXELS, generic_corpus.MAX_PIXELS)
    dataset = pretrain_tiny.SftDataset(samples, processor)
    recipe = {**pretrain_tiny.DEFAULTS, "steps": 12, "batch_size": 2, "curriculum": 0.5}
    order = pretrain_tiny.step_order(samples, dataset, recipe)
    regions = [[len(samples[i]["meta"]["things"]) for i in batch] for batch in order]
    assert len(order) == 12 and all(1 <= len(batch) <= 2 for batch in order)  # an epoch's last batch may be short
    assert all(count == 1 for batch in regions[:6] for count in batch)
    assert any(count > 1 for batch in regions[6:] for count in batch)


def test_the_shipped_weights_record_the_scripts_recipe_and_load_offline(monkeypatch) -> None:
    recipe = tiny.pretrained_recipe()  # the package's models/tiny_pretrained/
    assert {k: v for k, v in recipe.items() if k != "corpus_sha256"} == pretrain_tiny.DEFAULTS
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_base(ModelParams(name_or_path="tiny-pretrained"))
    random_model, random_processor = load_base(ModelParams(name_or_path="tiny-random"))
    assert processor.tokenizer.get_vocab() == random_processor.tokenizer.get_vocab()
    pretrained, random_state = model.state_dict(), random_model.state_dict()
    assert not torch.equal(
        pretrained["model.language_model.layers.0.mlp.up_proj.weight"],
        random_state["model.language_model.layers.0.mlp.up_proj.weight"],
    )
    assert torch.equal(pretrained["lm_head.weight"], random_state["lm_head.weight"])


@pytest.mark.slow
def test_the_shipped_corpus_digest_is_the_scripts_corpus(tmp_path: Path) -> None:
    recipe = tiny.pretrained_recipe()
    _, digest = pretrain_tiny.build_corpus(recipe["seed"], recipe["items"], tmp_path, recipe["recall_share"])
    assert digest == recipe["corpus_sha256"]
