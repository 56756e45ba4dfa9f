import re
from collections import Counter

import jsonschema
import pytest

from defectvlm.config import SftParams
from defectvlm.data.exports import IMAGE_TOKEN, export_sample, llamafactory_dataset_info
from defectvlm.data.sft import build_sft, load_knowledge, load_templates
from defectvlm.errors import StepFailure
from tests.conftest import run_cli, write_params

CLASSES = ["slag", "streak", "over_melt", "incomplete_spreading"]


def region(rid: int, label: str, cls: str | None = None) -> dict:
    return {
        "rid": f"R{rid}",
        "xyxy": [1.0, 2.0, 30.0, 40.0],
        "box": [1, 2, 30, 40],
        "label": label,
        "cls": cls,
        "source": "positive" if cls else "decoy",
    }


def image(i: int, label: str, classes: list[str]) -> dict:
    regions = [region(k + 1, "abnormal", c) for k, c in enumerate(classes)]
    regions += [region(len(regions) + k + 1, "normal") for k in range(2)]
    regions.reverse()  # ids are not in list order, as after the regions step's shuffle
    return {
        "id": f"{label}/b/{i}.jpg",
        "path": f"data/raw/{label}_root/b/{i}.jpg",
        "blake3": f"{i:064x}",
        "width": 100,
        "height": 100,
        "label": label,
        "family": "qwen2_5_vl",
        "frame": [100, 100],
        "regions": regions,
    }


def dataset(n: int = 40) -> dict[str, list[dict]]:
    # classes 0..3 with class 3 three times as common; every third image also holds class 0
    images = [image(i, "abnormal", [CLASSES[min(i % 6, 3)]] + ([CLASSES[0]] if i % 3 == 0 else [])) for i in range(n)]
    images += [image(1000 + i, "normal", []) for i in range(n)]
    return {"train": images, "val": images[:10], "test": images[-10:]}


def build(params: SftParams, data=None):
    return build_sft(data or dataset(), params, load_templates(params), load_knowledge(params))


LINE = re.compile(r"^(R\d+): (normal|abnormal \| (\w+))$")


def answer_lines(sample: dict) -> dict[str, tuple[str, str | None]]:
    found = {}
    for line in sample["messages"][2]["content"].splitlines():
        match = LINE.match(line)
        if match:
            found[match.group(1)] = ("abnormal", match.group(3)) if match.group(3) else ("normal", None)
    return found


@pytest.mark.parametrize("language", ["zh", "en"])
def test_answer_lines_match_the_regions_and_templates_render(language):
    result = build(SftParams(language=language, noise_ratio=0.5))
    for split, samples in result.splits.items():
        for sample in samples:
            truth = {r["rid"]: (r["label"], r["cls"]) for r in sample["meta"]["regions"]}
            lines = answer_lines(sample)
            if sample["task"] in ("classify", "explain"):
                target = sample["meta"]["target"]
                assert lines == {target: truth[target]}
            else:
                assert lines == truth
            text = sample["messages"][1]["content"][1]["text"]
            assert text.count("\nR") == len(truth) and "<regions>" in text
            for message in (sample["messages"][0]["content"], text, sample["messages"][2]["content"]):
                assert "{" not in message and "}" not in message, message
            if split != "train":
                assert sample["task"] == "detect" and sample["meta"]["noise"] is None
                assert sample["meta"]["template"] == {"system": 0, "question": 0}


@pytest.mark.parametrize("size", [1, 2])
def test_regions_per_prompt_splits_each_image_into_runs_of_its_regions(size):
    """Every region in exactly one conversation of its image, runs of at most `size` in rid order,
    each answered about its own regions only; with 0 the image stays one conversation."""
    whole = build(SftParams())
    result = build(SftParams(regions_per_prompt=size))
    for split, samples in result.splits.items():
        by_image: dict[str, list[dict]] = {}
        for sample in samples:
            by_image.setdefault(sample["image_id"], []).append(sample)
        assert len({s["id"] for s in samples}) == len(samples)
        for image_id, parts in by_image.items():
            theirs = [r for s in whole.splits[split] if s["image_id"] == image_id for r in s["meta"]["regions"]]
            mine = [
                r
                for s in sorted(parts, key=lambda s: int(s["meta"]["regions"][0]["rid"][1:]))
                for r in s["meta"]["regions"]
            ]
            if split != "train":  # train samples are copies (balance) in `whole` only once per image as well
                assert mine == sorted(theirs, key=lambda r: int(r["rid"][1:]))
            for sample in parts:
                rids = [int(r["rid"][1:]) for r in sample["meta"]["regions"]]
                assert len(rids) <= size and rids == list(range(rids[0], rids[0] + len(rids)))
                assert (rids[0] - 1) % size == 0
                if sample["task"] not in ("classify", "explain"):
                    assert set(answer_lines(sample)) == {f"R{n}" for n in rids}
    assert result.summary["splits"]["val"]["images"] == whole.summary["splits"]["val"]["images"]
    assert result.summary["splits"]["val"]["samples"] > whole.summary["splits"]["val"]["samples"]


def test_noise_only_on_train_and_answers_stay_correct():
    result = build(SftParams(noise_ratio=1.0))
    train = result.splits["train"]
    assert all(s["meta"]["noise"] for s in train)
    assert all(s["meta"]["noise"]["claim"] in s["messages"][0]["content"] for s in train)
    assert not any(s["meta"]["noise"] for split in ("val", "test") for s in result.splits[split])
    kinds = Counter(s["meta"]["noise"]["type"] for s in train)
    assert set(kinds) == {"wrong_class", "missed", "false_alarm"}
    assert build(SftParams(noise_ratio=0.0)).summary["splits"]["train"]["noised"] == 0


def test_all_question_categories_appear_on_train():
    tasks = build(SftParams()).summary["splits"]["train"]["tasks"]
    assert set(tasks) == {"detect", "classify", "explain", "confirm_normal", "count"}


@pytest.mark.parametrize("mode", ["oversample", "undersample"])
def test_balancing_evens_out_classes_on_train_only(mode):
    result = build(SftParams(balance=mode))
    report = result.summary["splits"]["train"]["balance"]
    assert len(set(report["images_per_class_before"].values())) > 1
    assert len(set(report["images_per_class_after"].values())) == 1
    assert result.summary["splits"]["val"]["samples"] == 10
    ids = [s["id"] for s in result.splits["train"]]
    assert len(ids) == len(set(ids))


def test_same_input_same_samples_whatever_the_order():
    data = dataset()
    reversed_data = {k: list(reversed(v)) for k, v in data.items()}
    assert build(SftParams(), data).splits == build(SftParams(), reversed_data).splits


def test_unknown_class_in_knowledge_is_a_clear_error():
    data = dataset()
    data["train"][0]["regions"][-1].update(label="abnormal", cls="crack")
    with pytest.raises(StepFailure, match="crack"):
        build(SftParams(), data)


# Schemas as documented by ms-swift (standard "messages" + "images" format) and
# LLaMA-Factory (sharegpt formatting with role/content tags and a system column).
MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {"content": {"type": "string"}}}
SWIFT_SCHEMA = {
    "type": "object",
    "required": ["messages", "images"],
    "additionalProperties": False,
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 2,
            "items": {
                **MESSAGE,
                "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
            },
        },
        "images": {"type": "array", "items": {"type": "string"}},
    },
}
LLAMAFACTORY_SCHEMA = {
    "type": "object",
    "required": ["messages", "images", "system"],
    "additionalProperties": False,
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 2,
            "items": {
                **MESSAGE,
                "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"type": "string"}},
            },
        },
        "system": {"type": "string"},
        "images": {"type": "array", "items": {"type": "string"}},
    },
}
DATASET_INFO_SCHEMA = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "required": ["file_name", "formatting", "columns", "tags"],
        "properties": {
            "formatting": {"const": "sharegpt"},
            "columns": {"type": "object", "required": ["messages", "images", "system"]},
            "tags": {"type": "object", "required": ["role_tag", "content_tag", "user_tag", "assistant_tag"]},
        },
    },
}


@pytest.mark.parametrize(("fmt", "schema"), [("swift", SWIFT_SCHEMA), ("llamafactory", LLAMAFACTORY_SCHEMA)])
def test_exports_validate_against_the_documented_schemas(fmt, schema):
    for sample in build(SftParams()).splits["train"]:
        exported = export_sample(sample, fmt, "images/0123.png")
        jsonschema.validate(exported, schema)
        text = "".join(m["content"] for m in exported["messages"])
        assert text.count(IMAGE_TOKEN) == len(exported["images"]) == 1 and exported["images"] == ["images/0123.png"]
        roles = [m["role"] for m in exported["messages"]]
        assert roles[-2:] == ["user", "assistant"]
        assert exported["messages"][-1]["content"] == sample["messages"][2]["content"]
    jsonschema.validate(llamafactory_dataset_info(), DATASET_INFO_SCHEMA)


def test_coords_plus_crops_puts_each_region_crop_after_its_line():
    result = build(SftParams(region_encoding="coords+crops"))
    sample = result.splits["val"][0]
    parts = sample["messages"][1]["content"]
    crops = [p for p in parts if p["type"] == "image" and "crop" in p]
    regions = sample["meta"]["regions"]
    assert parts[0] == {"type": "image", "image": sample["images"][0]}
    assert [c["crop"] for c in crops] == [r["xyxy"] for r in regions]
    crop_positions = [i for i, p in enumerate(parts) if p["type"] == "image" and "crop" in p]
    for position, region in zip(crop_positions, regions, strict=True):
        assert parts[position - 1]["text"].strip().startswith(f"{region['rid']}: [")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    assert text.count("<regions>") == 1 and text.rstrip().endswith("</regions>")
    with pytest.raises(Exception, match="native"):
        SftParams(region_encoding="coords+crops", format="swift")


@pytest.mark.parametrize("how", [("--format", "swift"), ("-S", "sft.format=swift"), ("--format", "llamafactory")])
def test_build_sft_format_option_is_validated_like_the_parameter(tmp_path, capsys, how):
    params = write_params(tmp_path / "params.yaml", {"sft": {"region_encoding": "coords+crops"}})
    code = run_cli("build-sft", "--params", params, "--in", tmp_path / "regions", "--out", tmp_path / "out", *how)
    err = capsys.readouterr().err
    assert code == 2 and "sft.region_encoding" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
