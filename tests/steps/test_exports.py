"""Exports that other tools read in the frame of our boxes, and the Ultralytics round trip.

The frames are checked with transformers' own Qwen2-VL image processor (what ms-swift and
LLaMA-Factory call for Qwen2.5-VL), built offline from the preprocessor config a real
checkpoint ships, fed the exported file the way those tools open it (no EXIF handling)."""

import math
import posixpath

import blake3
import numpy as np
import pytest
import yaml
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from defectvlm.config import SPLITS
from defectvlm.data.images import EXIF_ORIENTATION_TAG, load_upright
from defectvlm.io import read_jsonl
from tests.conftest import read_json, run_cli, write_params
from tests.fixtures.trees import write_tree

# preprocessor_config.json of Qwen/Qwen2.5-VL-7B-Instruct (the processor defaults a user trains with)
QWEN2_5_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
LLAMAFACTORY_DEFAULT_IMAGE_MAX_PIXELS = 768 * 768


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    roots = write_tree(root / "raw")
    data = {"abnormal_root": str(roots["abnormal"]), "normal_root": str(roots["normal"])}
    params = write_params(root / "params.yaml", {"data": data, "sft": {"region_encoding": "coords"}})
    steps = [("ingest", None, "01"), ("split", "01", "02"), ("regions", "02", "03")]
    for step, source, folder in steps:
        args = ["--quiet"] if source is None else ["--in", root / source]
        assert run_cli(step, "--params", params, "--out", root / folder, *args) == 0
    for fmt in ("swift", "llamafactory", "yolo"):
        assert run_cli("build-sft", "--params", params, "--in", root / "03", "--out", root / fmt, "--format", fmt) == 0
    return root


def processed_size(image: Image.Image, processor) -> tuple[int, int]:
    """Width, height of the pixels the processor feeds the model."""
    _, grid_h, grid_w = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    return grid_w * processor.patch_size, grid_h * processor.patch_size


def pre_shrink(image: Image.Image, image_max_pixels: int) -> Image.Image:
    """LLaMA-Factory's step before the processor: scale down to the budget, truncating to whole pixels."""
    if image.width * image.height <= image_max_pixels:
        return image
    scale = math.sqrt(image_max_pixels / (image.width * image.height))
    return image.resize((int(image.width * scale), int(image.height * scale)))


@pytest.mark.parametrize("fmt", ["swift", "llamafactory"])
def test_every_exported_image_is_fed_in_the_frame_of_its_boxes(prepared, fmt):
    processor = Qwen2VLImageProcessor.from_dict(QWEN2_5_VL_PREPROCESSOR)
    folder = prepared / fmt / fmt
    summary = read_json(prepared / fmt / "sft_summary.json")["export"]
    budgets = [LLAMAFACTORY_DEFAULT_IMAGE_MAX_PIXELS]
    if fmt == "llamafactory":
        budgets.append(yaml.safe_load((folder / "train_lora.yaml").read_text())["image_max_pixels"])
    manifest = {r["id"]: r for r in read_jsonl(prepared / "01" / "manifest.jsonl")}
    rotated = source_off_frame = 0
    for split in SPLITS:
        native = read_jsonl(prepared / fmt / f"{split}.jsonl")
        exported = read_jsonl(folder / f"{split}.jsonl")
        assert len(native) == len(exported) > 0
        for sample, record in zip(native, exported, strict=True):
            frame = tuple(sample["meta"]["frame"])
            with Image.open(folder / record["images"][0]) as image:
                assert EXIF_ORIENTATION_TAG not in image.getexif()
                pixels = image.convert("RGB")
            assert processed_size(pixels, processor) == frame
            for budget in budgets:
                assert processed_size(pre_shrink(pixels, budget), processor) == frame
            upright = np.asarray(load_upright(sample["images"][0]).resize(frame, Image.Resampling.BICUBIC))
            assert np.abs(np.asarray(pixels, dtype=float) - upright).mean() < 1
            text = record["messages"][-2]["content"]
            for region in sample["meta"]["regions"]:
                assert f"{region['rid']}: {region['box']}" in text
            rotated += manifest[sample["image_id"]]["orientation"] != 1
            with Image.open(sample["images"][0]) as source:
                source_off_frame += processed_size(source.convert("RGB"), processor) != frame
    assert rotated and source_off_frame  # the raw files would have been fed in other frames
    assert summary["template"] == {"swift": "qwen2_5_vl", "llamafactory": "qwen2_vl"}[fmt]
    assert summary["image_root"].startswith(str(folder)) and "smart_resize" in summary["frame_rule"]
    assert str(folder) in summary["command"]


def test_llamafactory_files_fit_together(prepared):
    folder = prepared / "llamafactory" / "llamafactory"
    config = yaml.safe_load((folder / "train_lora.yaml").read_text())
    info = read_json(folder / "dataset_info.json")
    assert config["dataset"] in info and config["eval_dataset"] in info
    assert config["template"] == "qwen2_vl" and config["dataset_dir"] == config["media_dir"] == "."
    for name in (config["dataset"], config["eval_dataset"]):
        for record in read_jsonl(folder / info[name]["file_name"]):
            with Image.open(folder / record["images"][0]) as image:
                assert image.width * image.height <= config["image_max_pixels"]


def test_export_is_content_addressed_and_rerun_byte_identical(prepared, tmp_path):
    folder = prepared / "swift" / "swift"
    before = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "images" / "stale.png").write_bytes(b"from an earlier run")
    params = prepared / "params.yaml"
    assert (
        run_cli(
            "build-sft", "--params", params, "--in", prepared / "03", "--out", prepared / "swift", "--format", "swift"
        )
        == 0
    )
    after = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert after == before
    referenced = {r["images"][0] for split in SPLITS for r in read_jsonl(folder / f"{split}.jsonl")}
    on_disk = {p.relative_to(folder).as_posix() for p in (folder / "images").iterdir()}
    assert referenced == on_disk
    for name in on_disk:
        assert blake3.blake3((folder / name).read_bytes()).hexdigest().startswith(posixpath.basename(name)[:-4])


def test_yolo_export_keeps_the_split_and_round_trips_through_ingest(prepared, tmp_path):
    folder = prepared / "yolo" / "yolo"
    classes = read_json(prepared / "yolo" / "sft_summary.json")["classes"]
    data = yaml.safe_load((folder / "data.yaml").read_text(encoding="utf-8"))
    assert data["names"] == dict(enumerate(classes))
    regions = {split: read_jsonl(prepared / "03" / f"{split}.jsonl") for split in SPLITS}
    for split in SPLITS:
        exported = {
            posixpath.splitext(p.relative_to(folder / "images" / split).as_posix())[0]
            for p in (folder / "images" / split).rglob("*.*")
        }
        assert exported == {posixpath.splitext(r["id"])[0] for r in regions[split]}

    (tmp_path / "empty").mkdir()
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(folder), "normal_root": str(tmp_path / "empty")}, "labels": {"label_map": {}}},
    )
    assert run_cli("ingest", "--params", params, "--out", tmp_path / "in", "--quiet") == 0
    back = {}
    for record in read_jsonl(tmp_path / "in" / "manifest.jsonl"):
        split, rel = record["id"].split("/", 3)[2:]
        back[(split, posixpath.splitext(rel)[0])] = record
    for split, rows in regions.items():
        for image in rows:
            record = back.pop((split, posixpath.splitext(image["id"])[0]))
            positives = sorted((r["xyxy"], r["cls"]) for r in image["regions"] if r["source"] == "positive")
            assert sorted((b["xyxy"], b["cls"]) for b in record["boxes"]) == positives
            assert (record["width"], record["height"], record["orientation"]) == (image["width"], image["height"], 1)
            assert record["label"] == ("abnormal" if positives else "normal")
    assert not back
