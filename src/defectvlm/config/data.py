"""The data sections: raw folders, labels, ingest, split, model frame, regions and SFT."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from defectvlm.config.base import AtLeastOne, Float, Fraction, Key, NonNegative, Section, fail

SPLITS = ("train", "val", "test")
TASKS = ("detect", "classify", "explain", "confirm_normal", "count")


class DataParams(Section):
    """Where the raw image trees live."""

    abnormal_root: str = Field(
        "data/raw/abnormal_root", description="Folder of defect images, each with a same-named label file."
    )
    normal_root: str = Field("data/raw/normal_root", description="Folder of normal images (no labels).")

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if not self.abnormal_root or not self.normal_root:
            fail("", "abnormal_root and normal_root must both be set")
        if Path(self.abnormal_root) == Path(self.normal_root):
            fail("normal_root", "must differ from data.abnormal_root")
        return self


LabelFormat = Literal["auto", "semicolon", "yolo", "labelstudio"]


class LabelParams(Section):
    """How label files are read and how raw labels map to canonical classes."""

    format: LabelFormat = Field(
        "auto", description="Label format: semicolon | yolo | labelstudio | auto (decided per file)."
    )
    coord_format: Literal["xyxy", "cxcywh"] = Field(
        "xyxy", description="Meaning of the 4 numbers of a semicolon-format box."
    )
    label_map: dict[Key, str] = Field(
        {}, description="Raw label -> canonical class; empty means every raw label is its own class."
    )
    unknown_label: Literal["error", "other", "drop"] = Field(
        "error",
        description="A raw label missing from label_map: fail the run, map it to 'other', or drop the box.",
    )
    use_predictions: bool = Field(
        False, description="Label Studio: use a task's model predictions as its labels when no human annotated it."
    )
    background_images: Literal["normal", "reject"] = Field(
        "normal",
        description="Ultralytics layout: an image with an empty or missing label file is a normal image, or rejected.",
    )

    @model_validator(mode="after")
    def _check(self) -> LabelParams:
        for raw, canonical in self.label_map.items():
            if not raw.strip() or not canonical.strip():
                fail(f"label_map.{raw}", "raw labels and classes must be non-empty")
        return self

    def canonical(self, raw: str) -> str | None:
        """The canonical class of a raw label, or None when the map does not know it."""
        if not self.label_map:
            return raw
        if raw in self.label_map:
            return self.label_map[raw]
        return raw if raw in self.label_map.values() else None


class IngestParams(Section):
    """How the ingest step checks images and boxes."""

    verify: Literal["header", "full"] = Field(
        "header",
        description="header: read size/EXIF from the header and check the end marker; full: decode every image.",
    )
    exif_policy: Literal["labels_on_display", "labels_on_stored", "reject"] = Field(
        "labels_on_display",
        description="EXIF-rotated images: labels drawn on the displayed image (kept), on the stored pixels "
        "(rotated), or reject.",
    )
    min_box_size: Annotated[Float, NonNegative] = Field(
        4.0, description="Boxes narrower or shorter than this many pixels are dropped."
    )
    duplicates: Literal["reject", "keep"] = Field(
        "reject",
        description="Identical content twice in one root: reject all copies but the first (by path), or keep all.",
    )
    max_rejected_fraction: Annotated[Float, Fraction] = Field(
        0.05, description="Fail the step when more than this fraction of images is rejected."
    )
    image_extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"], description="File suffixes treated as images."
    )
    workers: Annotated[int, NonNegative] = Field(
        0, description="Processes for hashing and header reads; 0 means one per CPU core."
    )

    @model_validator(mode="after")
    def _check(self) -> IngestParams:
        for ext in self.image_extensions:
            if not ext.startswith("."):
                fail("image_extensions", f"{ext!r} must start with '.'")
        return self


class SplitParams(Section):
    """How images are divided into train/val/test without leakage."""

    group_by: Literal["parent", "parent_depth", "regex", "none"] = Field(
        "parent",
        description="Group key: parent folder, its first group_depth folders, a regex over the path, or each image.",
    )
    group_depth: Annotated[int, AtLeastOne] = Field(
        1, description="group_by=parent_depth: how many leading folders of the relative path form the key."
    )
    group_regex: str = Field(
        "", description="group_by=regex: pattern searched in the relative path; group 1 (or the match) is the key."
    )
    ratios: dict[Key, Float] = Field(
        {"train": 0.8, "val": 0.1, "test": 0.1}, description="Target share of groups per split."
    )
    seed: int = Field(42, description="Seed of the group hash; changing it reshuffles every group.")
    holdout_list: list[str] = Field(
        [], description="Images (file name, relative path or id) forced into test with their groups."
    )

    @model_validator(mode="after")
    def _check(self) -> SplitParams:
        if set(self.ratios) != set(SPLITS):
            fail("ratios", f"needs exactly the keys {', '.join(SPLITS)}")
        if any(r < 0 for r in self.ratios.values()) or abs(sum(self.ratios.values()) - 1) > 1e-6:
            fail("ratios", f"must be >= 0 and sum to 1, got {self.ratios}")
        if self.ratios["train"] == 0:
            fail("ratios.train", "must be > 0")
        if self.group_by == "regex":
            try:
                re.compile(self.group_regex)
            except re.error as exc:
                fail("group_regex", f"not a valid regular expression: {exc}")
            if not self.group_regex:
                fail("group_regex", "must be set when group_by is regex")
        return self


class ModelParams(Section):
    """Which model family the data is prepared for (its coordinate frame and image budget)."""

    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"] = Field(
        "qwen2_5_vl", description="Model family: decides the box coordinate frame and the image factor."
    )
    name_or_path: str = Field(
        "tiny",
        description="'tiny' (offline model pretrained on a generic corpus, shipped in the package), 'tiny-random' "
        "(any family, random weights), a local path, or a hub id.",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "varlen_vision", "eager"] = Field(
        "auto",
        description="Attention kernel; auto: flash_attention_2 on CUDA when flash-attn is installed, else "
        "varlen_vision (torch varlen flash attention in a Qwen vision tower, sdpa in the LM) on CUDA, else sdpa.",
    )
    min_pixels: int = Field(56 * 56, description="Smallest image area (pixels) after the processor's resize.")
    max_pixels: int = Field(448 * 448, description="Largest image area (pixels) after the processor's resize.")

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            fail("max_pixels", f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        return self


class RegionParams(Section):
    """ROI candidates: label boxes plus negatives and decoys shaped like real defects."""

    min_box_size: Annotated[Float, NonNegative] = Field(
        8.0, description="Positives narrower or shorter than this many pixels are filtered."
    )
    merge_iou: Annotated[Float, Fraction] = Field(
        0.9, description="Positives of one class overlapping at least this much are merged (duplicates)."
    )
    abnormal_neg_per_pos: Annotated[int, NonNegative] = Field(
        1, description="Negatives per positive on abnormal images."
    )
    decoy_count: Literal["match_abnormal", "fixed"] = Field(
        "match_abnormal",
        description="Decoys per normal image: drawn from the training abnormal images' region counts, or "
        "normal_decoys_per_image.",
    )
    normal_decoys_per_image: Annotated[int, NonNegative] = Field(
        4, description="Decoy regions per normal image when decoy_count is fixed."
    )
    neg_max_iou: Annotated[Float, Fraction] = Field(
        0.1, description="Largest overlap (IoU) of a negative with any positive."
    )
    max_boxes_per_image: Annotated[int, AtLeastOne] = Field(
        8, description="Most regions per image; positives are kept first."
    )
    negatives_from: Literal["random", "detector", "both"] = Field(
        "random",
        description="Where negatives come from: random draws shaped like defects; detector: the false positives of "
        "out-of-fold detectors (never one that trained on the image); both: detector ones first, random ones fill.",
    )
    negatives_folds: int = Field(
        3,
        description="detector | both: k of the k-fold over the training split's groups (k detectors, each on k-1 "
        "folds; >= 2).",
    )
    negatives_detector_steps: Annotated[int, NonNegative] = Field(
        0, description="detector | both: optimizer steps of each fold's detector (0: detector.steps; fewer is cheaper)."
    )
    misplaced_per_pos: Annotated[int, NonNegative] = Field(
        0,
        description="Training split only: per positive, this many boxes cut from it or shifted off it (IoU with it "
        "above neg_max_iou, at most misplaced_max_iou), labelled normal, so that the cascade's VLM learns to reject "
        "a proposal that covers only part of a defect (the detector's typical false alarm).",
    )
    misplaced_max_iou: Annotated[Float, Fraction] = Field(
        0.4, description="Largest IoU of a misplaced box with its defect (below the cascade's match at 0.5)."
    )
    seed: int = Field(42, description="Seed; each image's draws use seed + image id, never processing order.")

    @model_validator(mode="after")
    def _check(self) -> RegionParams:
        if self.misplaced_per_pos and not self.neg_max_iou < self.misplaced_max_iou < 0.5:
            fail(
                "misplaced_max_iou",
                f"{self.misplaced_max_iou} must lie above neg_max_iou ({self.neg_max_iou}) and below 0.5 (the IoU at "
                "which the cascade counts a box as finding the defect): a misplaced box is one that does not",
            )
        if self.negatives_from != "random" and self.negatives_folds < 2:
            fail(
                "negatives_folds",
                f"{self.negatives_folds} is refused with negatives_from: {self.negatives_from}: a training image's "
                "detector negatives must come from a detector that never trained on it (leakage: its false "
                "positives on its own training images are not the ones it makes on new images). The rule is "
                "out-of-fold predictions, k-fold over the training groups with k >= 2; set it to 2 or more",
            )
        return self


class SftParams(Section):
    """Conversations for supervised fine-tuning."""

    language: Literal["zh", "en"] = Field("zh", description="Template language (templates/<language>.yaml).")
    templates: str = Field("", description="A template YAML to use instead of the built-in one for `language`.")
    knowledge: str = Field("", description="A defect glossary YAML to use instead of the built-in knowledge.yaml.")
    task_weights: dict[Key, Float] = Field(
        {"detect": 0.6, "classify": 0.1, "explain": 0.1, "confirm_normal": 0.1, "count": 0.1},
        description="Train only: relative frequency of each question category (val/test always use detect).",
    )
    summary: bool = Field(True, description="Append a one-line natural-language summary after the per-region lines.")
    noise_ratio: Annotated[Float, Fraction] = Field(
        0.05, description="Train only: share of samples whose system hint makes a wrong claim."
    )
    balance: Literal["none", "oversample", "undersample"] = Field(
        "none", description="Train only: balance defect classes."
    )
    format: Literal["native", "swift", "llamafactory", "yolo"] = Field(
        "native",
        description="Native files (always written) plus an export in <out>/<format>/: swift, llamafactory or yolo "
        "(Ultralytics).",
    )
    region_encoding: Literal["coords", "coords+crops"] = Field(
        "coords",
        description="Regions as box coordinates only, or also each region's crop as an extra image after its line.",
    )
    crop_size: int = Field(84, description="coords+crops: side of the square crop image in pixels (a multiple of 28).")
    regions_per_prompt: int = Field(
        0,
        ge=0,
        description="At most this many of an image's regions per conversation (0: all in one); an image with more "
        "gets several conversations, in rid order, and predict asks about new images the same way.",
    )
    seed: int = Field(42, description="Seed; each sample's draws use seed + sample id.")

    @model_validator(mode="after")
    def _check(self) -> SftParams:
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            fail(f"task_weights.{sorted(unknown)[0]}", f"unknown task (known: {', '.join(TASKS)})")
        if any(w < 0 for w in self.task_weights.values()) or not self.task_weights.get("detect", 0) > 0:
            fail("task_weights", "weights must be >= 0 and detect must be > 0")
        if self.crop_size < 28 or self.crop_size % 28:
            fail("crop_size", f"must be a positive multiple of 28, got {self.crop_size}")
        if self.region_encoding == "coords+crops" and self.format in ("swift", "llamafactory"):
            fail(
                "region_encoding",
                f"coords+crops is written in the native format only; the {self.format} export carries the whole "
                "image and the coordinates: set sft.region_encoding: coords (or -S sft.region_encoding=coords)",
            )
        return self
