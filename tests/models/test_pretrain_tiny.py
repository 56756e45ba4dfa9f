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
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(k.startswith("lm_head") for k in changed)


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
        assert all(line.split(": ")[1] in (*generic_corpus.THINGS, generic_corpus.NOTHING) for line in lines)


def test_pretrained_weights_load_and_tiny_keeps_the_random_model(tmp_path: Path) -> None:
    pretrain_tiny.main([*SHORT_RUN, "--out", str(tmp_path)])
    pretrained, processor = tiny.load_pretrained_tiny(3136, 200704, folder=tmp_path)
    with safe_open(str(tmp_path / tiny.WEIGHTS_FILE), "pt") as weights:
        assert all(torch.equal(weights.get_tensor(k), v) for k, v in pretrained.state_dict().items())
    assert tiny.pretrained_recipe(tmp_path)["seed"] == 3

    built, built_processor = tiny.build_tiny(ModelParams().min_pixels, ModelParams().max_pixels)
    for name in ("tiny", "tiny-random"):
        model, _ = load_base(ModelParams(name_or_path=name))
        assert all(torch.equal(v, built.state_dict()[k]) for k, v in model.state_dict().items()), name
    # the SFT prompts tokenize exactly as with the tokenizer built from the templates
    assert processor.tokenizer.get_vocab() == built_processor.tokenizer.get_vocab()


def test_missing_pretrained_weights_name_the_command_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(StepFailure, match="python -m defectvlm.models.pretrain_tiny"):
        tiny.load_pretrained_tiny(3136, 200704, folder=tmp_path)
