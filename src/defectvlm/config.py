"""params.yaml -> frozen dataclasses, one per section, validated on load.

Every field carries a one-line doc in its metadata (`param(default, "doc")`), which
`defectvlm params` prints. Loading rejects unknown keys, wrong types and impossible
values with a `ConfigError` naming the file, the line and the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names file, line and key."""


def param(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class DataParams:
    """Where the raw image trees live."""

    abnormal_root: str = param("data/raw/abnormal_root", "Folder of defect images, each with a same-named label file.")
    normal_root: str = param("data/raw/normal_root", "Folder of normal images (no labels).")

    def __post_init__(self) -> None:
        if not self.abnormal_root or not self.normal_root:
            _fail("data", "abnormal_root and normal_root must both be set")
        if Path(self.abnormal_root) == Path(self.normal_root):
            _fail("data.normal_root", "must differ from data.abnormal_root")


LabelFormat = Literal["auto", "semicolon", "yolo", "labelstudio"]


@dataclass(frozen=True)
class LabelParams:
    """How label files are read and how raw labels map to canonical classes."""

    format: LabelFormat = param("auto", "Label format: semicolon | yolo | labelstudio | auto (decided per file).")
    coord_format: Literal["xyxy", "cxcywh"] = param("xyxy", "Meaning of the 4 numbers of a semicolon-format box.")
    label_map: dict[str, str] = param({}, "Raw label -> canonical class; empty means every raw label is its own class.")
    unknown_label: Literal["error", "other", "drop"] = param(
        "error", "A raw label missing from label_map: fail the run, map it to 'other', or drop the box."
    )
    use_predictions: bool = param(
        False, "Label Studio: use a task's model predictions as its labels when no human annotated it."
    )
    background_images: Literal["normal", "reject"] = param(
        "normal", "Ultralytics layout: an image with an empty or missing label file is a normal image, or rejected."
    )

    def __post_init__(self) -> None:
        for raw, canonical in self.label_map.items():
            if not str(raw).strip() or not str(canonical).strip():
                _fail(f"labels.label_map.{raw}", "raw labels and classes must be non-empty")

    def canonical(self, raw: str) -> str | None:
        """The canonical class of a raw label, or None when the map does not know it."""
        if not self.label_map:
            return raw
        if raw in self.label_map:
            return self.label_map[raw]
        return raw if raw in self.label_map.values() else None


@dataclass(frozen=True)
class IngestParams:
    """How the ingest step checks images and boxes."""

    verify: Literal["header", "full"] = param(
        "header", "header: read size/EXIF from the header and check the end marker; full: decode every image."
    )
    exif_policy: Literal["labels_on_display", "labels_on_stored", "reject"] = param(
        "labels_on_display",
        "EXIF-rotated images: labels drawn on the displayed image (kept), on the stored pixels (rotated), or reject.",
    )
    min_box_size: float = param(4.0, "Boxes narrower or shorter than this many pixels are dropped.")
    duplicates: Literal["reject", "keep"] = param(
        "reject", "Identical content twice in one root: reject all copies but the first (by path), or keep all."
    )
    max_rejected_fraction: float = param(0.05, "Fail the step when more than this fraction of images is rejected.")
    image_extensions: list[str] = param(
        [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"], "File suffixes treated as images."
    )
    workers: int = param(0, "Processes for hashing and header reads; 0 means one per CPU core.")

    def __post_init__(self) -> None:
        if self.min_box_size < 0:
            _fail("ingest.min_box_size", f"must be >= 0, got {self.min_box_size}")
        if not 0 <= self.max_rejected_fraction <= 1:
            _fail("ingest.max_rejected_fraction", f"must be within [0, 1], got {self.max_rejected_fraction}")
        if self.workers < 0:
            _fail("ingest.workers", f"must be >= 0, got {self.workers}")
        for ext in self.image_extensions:
            if not ext.startswith("."):
                _fail("ingest.image_extensions", f"{ext!r} must start with '.'")


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitParams:
    """How images are divided into train/val/test without leakage."""

    group_by: Literal["parent", "parent_depth", "regex", "none"] = param(
        "parent", "Group key: parent folder, its first group_depth folders, a regex over the path, or each image."
    )
    group_depth: int = param(1, "group_by=parent_depth: how many leading folders of the relative path form the key.")
    group_regex: str = param(
        "", "group_by=regex: pattern searched in the relative path; group 1 (or the match) is the key."
    )
    ratios: dict[str, float] = param({"train": 0.8, "val": 0.1, "test": 0.1}, "Target share of groups per split.")
    seed: int = param(42, "Seed of the group hash; changing it reshuffles every group.")
    holdout_list: list[str] = param([], "Images (file name, relative path or id) forced into test with their groups.")

    def __post_init__(self) -> None:
        if set(self.ratios) != set(SPLITS):
            _fail("split.ratios", f"needs exactly the keys {', '.join(SPLITS)}")
        if any(r < 0 for r in self.ratios.values()) or abs(sum(self.ratios.values()) - 1) > 1e-6:
            _fail("split.ratios", f"must be >= 0 and sum to 1, got {self.ratios}")
        if self.ratios["train"] == 0:
            _fail("split.ratios.train", "must be > 0")
        if self.group_depth < 1:
            _fail("split.group_depth", f"must be >= 1, got {self.group_depth}")
        if self.group_by == "regex":
            try:
                re.compile(self.group_regex)
            except re.error as exc:
                _fail("split.group_regex", f"not a valid regular expression: {exc}")
            if not self.group_regex:
                _fail("split.group_regex", "must be set when group_by is regex")


@dataclass(frozen=True)
class ModelParams:
    """Which model family the data is prepared for (its coordinate frame and image budget)."""

    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"] = param(
        "qwen2_5_vl", "Model family: decides the box coordinate frame and the image factor."
    )
    name_or_path: str = param(
        "tiny", "'tiny' (offline test model), 'tiny-random' (any family, random weights), a local path, or a hub id."
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = param(
        "auto", "Attention kernel; auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa."
    )
    min_pixels: int = param(56 * 56, "Smallest image area (pixels) after the processor's resize.")
    max_pixels: int = param(448 * 448, "Largest image area (pixels) after the processor's resize.")

    def __post_init__(self) -> None:
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            _fail("model.max_pixels", f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


@dataclass(frozen=True)
class RegionParams:
    """ROI candidates: label boxes plus negatives and decoys shaped like real defects."""

    min_box_size: float = param(8.0, "Positives narrower or shorter than this many pixels are filtered.")
    merge_iou: float = param(0.9, "Positives of one class overlapping at least this much are merged (duplicates).")
    abnormal_neg_per_pos: int = param(1, "Negatives per positive on abnormal images.")
    decoy_count: Literal["match_abnormal", "fixed"] = param(
        "match_abnormal",
        "Decoys per normal image: drawn from the training abnormal images' region counts, or normal_decoys_per_image.",
    )
    normal_decoys_per_image: int = param(4, "Decoy regions per normal image when decoy_count is fixed.")
    neg_max_iou: float = param(0.1, "Largest overlap (IoU) of a negative with any positive.")
    max_boxes_per_image: int = param(8, "Most regions per image; positives are kept first.")
    negatives_from: Literal["random", "detector", "both"] = param(
        "random",
        "Where negatives come from: random draws shaped like defects. detector | both (the detector's false "
        "positives as hard negatives) are refused: they need out-of-fold detector predictions (not built).",
    )
    seed: int = param(42, "Seed; each image's draws use seed + image id, never processing order.")

    def __post_init__(self) -> None:
        for key in ("min_box_size", "abnormal_neg_per_pos", "normal_decoys_per_image"):
            if getattr(self, key) < 0:
                _fail(f"regions.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("merge_iou", "neg_max_iou"):
            if not 0 <= getattr(self, key) <= 1:
                _fail(f"regions.{key}", f"must be within [0, 1], got {getattr(self, key)}")
        if self.max_boxes_per_image < 1:
            _fail("regions.max_boxes_per_image", f"must be >= 1, got {self.max_boxes_per_image}")
        if self.negatives_from != "random":
            _fail(
                "regions.negatives_from",
                f"{self.negatives_from} is refused: the detector's predictions on training images would come from "
                "a detector trained on those same images (leakage: its false positives there are not the ones it "
                "makes on new images). It needs out-of-fold predictions (k-fold over training groups), which are "
                "not built yet; use random",
            )


TASKS = ("detect", "classify", "explain", "confirm_normal", "count")


@dataclass(frozen=True)
class SftParams:
    """Conversations for supervised fine-tuning."""

    language: Literal["zh", "en"] = param("zh", "Template language (templates/<language>.yaml).")
    templates: str = param("", "A template YAML to use instead of the built-in one for `language`.")
    knowledge: str = param("", "A defect glossary YAML to use instead of the built-in knowledge.yaml.")
    task_weights: dict[str, float] = param(
        {"detect": 0.6, "classify": 0.1, "explain": 0.1, "confirm_normal": 0.1, "count": 0.1},
        "Train only: relative frequency of each question category (val/test always use detect).",
    )
    summary: bool = param(True, "Append a one-line natural-language summary after the per-region lines.")
    noise_ratio: float = param(0.05, "Train only: share of samples whose system hint makes a wrong claim.")
    balance: Literal["none", "oversample", "undersample"] = param("none", "Train only: balance defect classes.")
    format: Literal["native", "swift", "llamafactory", "yolo"] = param(
        "native",
        "Native files (always written) plus an export in <out>/<format>/: swift, llamafactory or yolo (Ultralytics).",
    )
    region_encoding: Literal["coords", "coords+crops"] = param(
        "coords", "Regions as box coordinates only, or also each region's crop as an extra image after its line."
    )
    crop_size: int = param(84, "coords+crops: side of the square crop image in pixels (a multiple of 28).")
    seed: int = param(42, "Seed; each sample's draws use seed + sample id.")

    def __post_init__(self) -> None:
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            _fail(f"sft.task_weights.{sorted(unknown)[0]}", f"unknown task (known: {', '.join(TASKS)})")
        if any(w < 0 for w in self.task_weights.values()) or not self.task_weights.get("detect", 0) > 0:
            _fail("sft.task_weights", "weights must be >= 0 and detect must be > 0")
        if not 0 <= self.noise_ratio <= 1:
            _fail("sft.noise_ratio", f"must be within [0, 1], got {self.noise_ratio}")
        if self.crop_size < 28 or self.crop_size % 28:
            _fail("sft.crop_size", f"must be a positive multiple of 28, got {self.crop_size}")
        if self.region_encoding == "coords+crops" and self.format in ("swift", "llamafactory"):
            _fail(
                "sft.region_encoding",
                f"coords+crops is written in the native format only; the {self.format} export carries the whole "
                "image and the coordinates: set sft.region_encoding: coords (or -S sft.region_encoding=coords)",
            )


@dataclass(frozen=True)
class LoraParams:
    """LoRA adapter shape (shared by every phase)."""

    r: int = param(16, "LoRA rank.")
    alpha: int = param(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = param(0.0, "Dropout on the LoRA input (0: +3.6 % speed and 7.5 GiB less on a 7B, RESULTS.md).")

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            _fail("train.lora.r", f"r and alpha must be >= 1, got {self.r}, {self.alpha}")
        if not 0 <= self.dropout < 1:
            _fail("train.lora.dropout", f"must be within [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class PhaseParams:
    """One training phase: which parts train and at which learning rate (phases are data)."""

    enabled: bool = param(True, "Run this phase; a disabled phase is skipped and the next starts from the last run.")
    epochs: float = param(1.0, "Passes over the training split (fractions allowed).")
    max_steps: int = param(0, "Stop after this many optimizer steps (0: epochs decide).")
    lr_lm: float = param(2e-4, "Learning rate of the language model's LoRA.")
    lr_proj: float = param(2e-4, "Learning rate of the projector (fully trained in every phase).")
    vision_lora_top_n: int = param(0, "LoRA on the top N vision blocks (phase 2 on).")
    lr_vision_lora: float = param(5e-5, "Learning rate of the vision LoRA.")
    unfreeze_top_k: int = param(0, "Fully train the top K vision blocks (phase 3).")
    lr_vision: float = param(1e-5, "Learning rate of the unfrozen vision blocks.")

    def __post_init__(self) -> None:
        for key in ("epochs", "max_steps", "vision_lora_top_n", "unfreeze_top_k"):
            if getattr(self, key) < 0:
                _fail(f"train.phase.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("lr_lm", "lr_proj", "lr_vision_lora", "lr_vision"):
            if getattr(self, key) < 0:
                _fail(f"train.phase.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.epochs == 0 and self.max_steps == 0:
            _fail("train.phase.epochs", "epochs or max_steps must be > 0")


METRIC_DIRECTIONS = {"roi_f1": True, "eval_loss": False}  # metric_for_best_model -> larger is better


@dataclass(frozen=True)
class TrainParams:
    """Phased LoRA training (DeepSpeed)."""

    output_dir: str = param("runs", "Phase N writes to <output_dir>/phaseN.")
    deepspeed: str = param("configs/deepspeed/zero2.json", "DeepSpeed config; 'auto' values are filled from here.")
    launcher: Literal["local", "trainjob"] = param(
        "local", "Cluster pipeline only: train in the step's own pod, or as a multi-node Kubeflow TrainJob."
    )
    seed: int = param(42, "Seed of initialisation, data order and dropout.")
    batch_size: int = param(4, "Micro-batch per process.")
    grad_accum: int = param(1, "Micro-batches per optimizer step.")
    max_length: int = param(4096, "Longer samples are skipped and counted.")
    group_by_length: bool = param(True, "Batch samples of similar length together (less padding).")
    num_workers: int = param(
        2, "DataLoader worker processes that decode and process the next batches' images (0: in the training process)."
    )
    warmup_ratio: float = param(0.1, "Share of steps with linear warm-up, then cosine decay.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    max_grad_norm: float = param(1.0, "Gradient clipping.")
    gradient_checkpointing: bool = param(False, "Recompute activations in backward (less memory, ~30% slower).")
    qlora: bool = param(False, "Load the base in 4 bit (bitsandbytes, CUDA only).")
    logging_steps: int = param(5, "Log loss, learning rates and token efficiency every N steps.")
    eval_steps: int = param(20, "Validation loss every N steps (and at the end).")
    save_steps: int = param(20, "Checkpoint (for --resume) every N steps.")
    save_total_limit: int = param(2, "Checkpoints kept (the best model is kept apart).")
    metric_for_best_model: Literal["roi_f1", "eval_loss"] = param(
        "roi_f1", "Metric that picks the best checkpoint: val ROI-level F1 (scoring pass) or val loss."
    )
    greater_is_better: bool = param(
        True, "Whether a larger metric is better: must be true for roi_f1 and false for eval_loss (checked)."
    )
    lora: LoraParams = param(LoraParams(), "LoRA shape.")
    phase1: PhaseParams = param(PhaseParams(epochs=3.0), "Phase 1: vision tower frozen; projector + LM LoRA.")
    phase2: PhaseParams = param(
        PhaseParams(epochs=1.0, vision_lora_top_n=2), "Phase 2: + LoRA on the top N vision blocks."
    )
    phase3: PhaseParams = param(
        PhaseParams(epochs=1.0, vision_lora_top_n=2, unfreeze_top_k=1), "Phase 3: + top K vision blocks unfrozen."
    )

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "max_length", "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, key) < 1:
                _fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            _fail("train.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.save_total_limit < 1:
            _fail("train.save_total_limit", f"must be >= 1, got {self.save_total_limit}")
        if not 0 <= self.warmup_ratio < 1:
            _fail("train.warmup_ratio", f"must be within [0, 1), got {self.warmup_ratio}")
        higher_is_better = METRIC_DIRECTIONS[self.metric_for_best_model]
        if self.greater_is_better != higher_is_better:
            _fail(
                "train.greater_is_better",
                f"{self.metric_for_best_model} is better when {'higher' if higher_is_better else 'lower'}: set "
                f"train.greater_is_better: {str(higher_is_better).lower()} (otherwise the worst checkpoint is kept)",
            )
        if self.phase1.vision_lora_top_n or self.phase1.unfreeze_top_k:
            _fail(
                "train.phase1", "phase 1 keeps the vision tower frozen: vision_lora_top_n and unfreeze_top_k must be 0"
            )
        if self.phase2.vision_lora_top_n < 1 or self.phase2.unfreeze_top_k:
            _fail("train.phase2", "phase 2 needs vision_lora_top_n >= 1 and unfreeze_top_k 0")
        if self.phase3.unfreeze_top_k < 1:
            _fail("train.phase3.unfreeze_top_k", "phase 3 needs unfreeze_top_k >= 1")

    def phase(self, number: int) -> PhaseParams:
        return getattr(self, f"phase{number}")


@dataclass(frozen=True)
class TrackingParams:
    """Where runs are recorded (MLflow). Credentials come from the environment, never from here."""

    uri: str = param("sqlite:///mlflow.db", "MLflow tracking URI (sqlite file, http://server, ...).")
    experiment: str = param("defectvlm", "MLflow experiment name.")


GATE_METRICS = ("roi.f1", "roi.precision", "roi.recall", "image.f1", "image.auroc", "image.average_precision")


@dataclass(frozen=True)
class RegistryParams:
    """Model registry (MLflow): what a registered adapter is called and what it must reach to become champion."""

    model_name: str = param("defectvlm-adapter", "Registered model name; each `register` adds a version.")
    gates: dict[str, float] = param(
        {"roi.f1": 0.3, "image.auroc": 0.55},
        "Minimum test metrics for promotion (keys: " + ", ".join(GATE_METRICS) + ").",
    )
    reproduce_tolerance: float = param(0.02, "`reproduce`: largest allowed difference of a re-derived test metric.")
    require_export_parity: bool = param(
        False, "`promote` refuses a version without a passed `defectvlm export` parity check (tag export.parity)."
    )

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            _fail("registry.model_name", "must be non-empty")
        for key, value in self.gates.items():
            if key not in GATE_METRICS:
                _fail(f"registry.gates.{key}", f"unknown metric (known: {', '.join(GATE_METRICS)})")
            if not 0 <= value <= 1:
                _fail(f"registry.gates.{key}", f"must be within [0, 1], got {value}")
        if self.reproduce_tolerance < 0:
            _fail("registry.reproduce_tolerance", f"must be >= 0, got {self.reproduce_tolerance}")


@dataclass(frozen=True)
class DetectorParams:
    """The proposal detector of the cascade (`train-detector`): trained from scratch on the VLM's train/val split."""

    backend: Literal["centernet"] = param(
        "centernet", "centernet: a small CNN with a centre-heatmap head (torch, BSD; ONNX export). No download."
    )
    output_dir: str = param("runs/detector", "Weights, detector.onnx, metrics.json and detector.json go here.")
    input_size: int = param(512, "Side of the square letterboxed input in pixels (a multiple of 16).")
    crop_size: int = param(256, "Training crops of the letterboxed image (a multiple of 16, <= input_size).")
    width: int = param(16, "Channels of the first stage (the network grows from there).")
    steps: int = param(1500, "Optimizer steps (fixed, not timed: same inputs give the same weights).")
    batch_size: int = param(8, "Crops per step.")
    lr: float = param(3e-3, "AdamW learning rate (cosine decay, 5 % warm-up).")
    confidence: float = param(
        0.05, "Proposal confidence: boxes at or above it become regions (low: the VLM rejects what is wrong)."
    )
    nms_iou: float = param(0.5, "Per-class non-maximum suppression IoU.")
    threads: int = param(2, "CPU threads for training and export (fixed: results do not depend on the machine).")
    seed: int = param(42, "Seed of initialisation, crops and flips.")

    def __post_init__(self) -> None:
        for key in ("input_size", "crop_size"):
            if getattr(self, key) < 32 or getattr(self, key) % 16:
                _fail(f"detector.{key}", f"must be a multiple of 16 and >= 32, got {getattr(self, key)}")
        if self.crop_size > self.input_size:
            _fail("detector.crop_size", f"must be <= input_size ({self.input_size}), got {self.crop_size}")
        for key in ("width", "steps", "batch_size", "threads"):
            if getattr(self, key) < 1:
                _fail(f"detector.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            _fail("detector.lr", f"must be > 0, got {self.lr}")
        for key in ("confidence", "nms_iou"):
            if not 0 <= getattr(self, key) <= 1:
                _fail(f"detector.{key}", f"must be within [0, 1], got {getattr(self, key)}")


@dataclass(frozen=True)
class TrainJobParams:
    """A Kubeflow Trainer v2 TrainJob per training phase (train.launcher: trainjob): torchrun on every node."""

    num_nodes: int = param(2, "Training nodes (pods).")
    num_proc_per_node: int = param(8, "Processes per node (one per GPU).")
    gpus_per_node: int = param(8, "GPUs each node requests (resourcesPerNode).")
    cpu_per_node: str = param("32", "CPU each node requests (Kubernetes quantity).")
    memory_per_node: str = param("256Gi", "Memory each node requests (Kubernetes quantity).")
    runtime: str = param("torch-distributed", "ClusterTrainingRuntime the TrainJob runs on.")
    namespace: str = param("", "Namespace of the TrainJob; empty means the pipeline step's own namespace.")
    image: str = param("", "Trainer image; empty means the pipeline's training image.")
    timeout_hours: float = param(72.0, "Fail (and delete the TrainJob) when it has not finished after this long.")

    def __post_init__(self) -> None:
        for key in ("num_nodes", "num_proc_per_node"):
            if getattr(self, key) < 1:
                _fail(f"trainjob.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0:
            _fail("trainjob.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        if self.timeout_hours <= 0:
            _fail("trainjob.timeout_hours", f"must be > 0, got {self.timeout_hours}")


@dataclass(frozen=True)
class ClusterParams:
    """How the Kubeflow pipeline runs on the cluster; read when it is compiled (not pipeline parameters)."""

    image_registry: str = param("ghcr.io/defectvlm", "Registry the images are pushed to (defectvlm-data, -train).")
    workspace: str = param("/workspace", "Mount path of the shared volume: raw images and checkpoints live here.")
    workspace_pvc: str = param("defectvlm-workspace", "PersistentVolumeClaim (ReadWriteMany) mounted at workspace.")
    secrets: dict[str, list[str]] = param(
        {
            "defectvlm-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"],
            "defectvlm-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
        },
        "Kubernetes secret -> keys exposed to every step as environment variables of the same name.",
    )
    service_account: str = param(
        "", "Service account of a submitted run; empty: KFP's default. It needs pipelines/rbac.yaml's role."
    )
    accelerator_type: str = param("nvidia.com/gpu", "Accelerator resource of a training step.")
    gpus: int = param(1, "GPUs of a training step with train.launcher: local.")
    train_cpu: str = param("8", "CPU request of a training or evaluation step.")
    train_memory: str = param("64Gi", "Memory request of a training or evaluation step.")
    shm_size: str = param("16Gi", "/dev/shm (in-memory emptyDir) of a training step: NCCL and data loaders need it.")
    node_selector: dict[str, str] = param({}, "Node labels a training or evaluation step must run on.")
    tolerations: list[dict[str, str]] = param(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "Tolerations of a training or evaluation step (Kubernetes toleration objects).",
    )
    retries: int = param(2, "Retries of a step that reads or writes shared storage.")

    def __post_init__(self) -> None:
        if not self.workspace.startswith("/"):
            _fail("cluster.workspace", f"must be an absolute path, got {self.workspace!r}")
        if self.gpus < 0 or self.retries < 0:
            _fail("cluster.gpus", "gpus and retries must be >= 0")


@dataclass(frozen=True)
class ServeParams:
    """The HTTP service (`defectvlm serve`): limits, dynamic batching, auth and alias following."""

    host: str = param("127.0.0.1", "Address to bind; 127.0.0.1 keeps the service off the network unless told.")
    port: int = param(8000, "TCP port.")
    max_batch_size: int = param(8, "Most images scored in one forward pass (1 turns batching off).")
    max_wait_ms: float = param(10.0, "How long the first request of a batch waits for others to join it.")
    queue_size: int = param(64, "Requests waiting at most; more are refused with 503 and Retry-After.")
    request_timeout_s: float = param(30.0, "A request not answered within this many seconds gets 504.")
    max_body_bytes: int = param(20_000_000, "Largest request body; larger uploads get 413 before they are read.")
    max_image_pixels: int = param(40_000_000, "Largest image (width x height, from the header); larger get 413.")
    max_boxes: int = param(32, "Most boxes in one request.")
    max_new_tokens: int = param(256, "Largest answer of /v1/chat/completions (a request may ask for fewer).")
    token_env: str = param("DEFECTVLM_SERVE_TOKEN", "Environment variable with the bearer token; unset: no auth.")
    follow_interval_s: float = param(30.0, "How often a models:/name@alias model asks the registry if it moved.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            _fail("serve.port", f"must be within 1..65535, got {self.port}")
        for key in ("max_batch_size", "queue_size", "max_body_bytes", "max_image_pixels", "max_boxes"):
            if getattr(self, key) < 1:
                _fail(f"serve.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_wait_ms", "request_timeout_s", "follow_interval_s"):
            if getattr(self, key) < 0:
                _fail(f"serve.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.max_new_tokens < 1:
            _fail("serve.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Params:
    """All parameters of a pipeline run (one section per step family)."""

    data: DataParams = param(DataParams(), "Input folders.")
    labels: LabelParams = param(LabelParams(), "Label parsing and class mapping.")
    ingest: IngestParams = param(IngestParams(), "Ingest checks.")
    split: SplitParams = param(SplitParams(), "Train/val/test split.")
    model: ModelParams = param(ModelParams(), "Model family and image budget.")
    regions: RegionParams = param(RegionParams(), "ROI candidates.")
    sft: SftParams = param(SftParams(), "SFT conversations.")
    train: TrainParams = param(TrainParams(), "Phased training.")
    tracking: TrackingParams = param(TrackingParams(), "Experiment tracking.")
    registry: RegistryParams = param(RegistryParams(), "Model registry and promotion gates.")
    detector: DetectorParams = param(DetectorParams(), "Proposal detector of the cascade (train-detector).")
    trainjob: TrainJobParams = param(TrainJobParams(), "Multi-node training (train.launcher: trainjob).")
    cluster: ClusterParams = param(ClusterParams(), "Kubeflow Pipelines: images, resources, secrets.")
    serve: ServeParams = param(ServeParams(), "The inspection service (defectvlm serve).")


# --- loading -------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; errors name the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        lines = _key_lines(text)
        raw = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {exc}") from None


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a plain dict (as loaded from YAML) into Params."""
    return _build(Params, raw, "")


def params_to_dict(params: Any) -> dict[str, Any]:
    """Plain-dict view of Params (or any section), for logging and resolved-params files."""
    return dataclasses.asdict(params)


def field_docs(cls: type = Params, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, f.metadata.get("doc", ""), default))
    return rows


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        _fail(prefix.rstrip(".") or "params", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        _fail(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            # a partly given section keeps this field's own defaults (phase2 differs from phase1)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default)}, **(value or {})}
            value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
        values[f.name] = _coerce(hints[f.name], value, f"{prefix}{f.name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            _fail(key, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as text
    if (
        hint is bool
        and not isinstance(value, bool)
        or not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        _fail(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML document."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines
