"""The training sections: LoRA, the phases, the trainer, tracking, the registry and the detector."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from defectvlm.config.base import AtLeastOne, Float, Fraction, Key, NonNegative, OpenFraction, Section, fail

METRIC_DIRECTIONS = {
    "roi_f1": True,
    "roi_f1_type": True,
    "eval_loss": False,
}  # metric_for_best_model -> larger is better
GATE_METRICS = ("roi.f1", "roi.precision", "roi.recall", "image.f1", "image.auroc", "image.average_precision")


class LoraParams(Section):
    """LoRA adapter shape (shared by every phase)."""

    r: int = Field(16, description="LoRA rank.")
    alpha: int = Field(32, description="LoRA alpha (scale = alpha / r).")
    dropout: Annotated[Float, OpenFraction] = Field(
        0.0, description="Dropout on the LoRA input (0: +3.6 % speed and 7.5 GiB less on a 7B, RESULTS.md)."
    )

    @model_validator(mode="after")
    def _check(self) -> LoraParams:
        if self.r < 1 or self.alpha < 1:
            fail("r", f"r and alpha must be >= 1, got {self.r}, {self.alpha}")
        return self


class PhaseParams(Section):
    """One training phase: which parts train and at which learning rate (phases are data)."""

    enabled: bool = Field(
        True, description="Run this phase; a disabled phase is skipped and the next starts from the last run."
    )
    epochs: Annotated[Float, NonNegative] = Field(
        1.0, description="Passes over the training split (fractions allowed)."
    )
    max_steps: Annotated[int, NonNegative] = Field(
        0, description="Stop after this many optimizer steps (0: epochs decide)."
    )
    lr_lm: Annotated[Float, NonNegative] = Field(2e-4, description="Learning rate of the language model's LoRA.")
    lr_proj: Annotated[Float, NonNegative] = Field(
        2e-4, description="Learning rate of the projector (fully trained in every phase)."
    )
    vision_lora_top_n: Annotated[int, NonNegative] = Field(
        0, description="LoRA on the top N vision blocks (phase 2 on)."
    )
    lr_vision_lora: Annotated[Float, NonNegative] = Field(5e-5, description="Learning rate of the vision LoRA.")
    unfreeze_top_k: Annotated[int, NonNegative] = Field(0, description="Fully train the top K vision blocks (phase 3).")
    lr_vision: Annotated[Float, NonNegative] = Field(1e-5, description="Learning rate of the unfrozen vision blocks.")

    @model_validator(mode="after")
    def _check(self) -> PhaseParams:
        if self.epochs == 0 and self.max_steps == 0:
            fail("epochs", "epochs or max_steps must be > 0")
        return self


class TrainParams(Section):
    """Phased LoRA training (DeepSpeed)."""

    output_dir: str = Field("runs", description="Phase N writes to <output_dir>/phaseN.")
    deepspeed: str = Field(
        "configs/deepspeed/zero2.json", description="DeepSpeed config; 'auto' values are filled from here."
    )
    launcher: Literal["local", "trainjob"] = Field(
        "local",
        description="Cluster pipeline only: train in the step's own pod, or as a multi-node Kubeflow TrainJob.",
    )
    seed: int = Field(42, description="Seed of initialisation, data order and dropout.")
    batch_size: Annotated[int, AtLeastOne] = Field(4, description="Micro-batch per process.")
    grad_accum: Annotated[int, AtLeastOne] = Field(1, description="Micro-batches per optimizer step.")
    max_length: Annotated[int, AtLeastOne] = Field(4096, description="Longer samples are skipped and counted.")
    group_by_length: bool = Field(True, description="Batch samples of similar length together (less padding).")
    num_workers: Annotated[int, NonNegative] = Field(
        2,
        description="DataLoader worker processes that decode and process the next batches' images (0: in the "
        "training process).",
    )
    warmup_ratio: Annotated[Float, OpenFraction] = Field(
        0.1, description="Share of steps with linear warm-up, then cosine decay."
    )
    weight_decay: Float = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: Float = Field(1.0, description="Gradient clipping.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (less memory, ~30% slower)."
    )
    qlora: bool = Field(False, description="Load the base in 4 bit (bitsandbytes, CUDA only).")
    logging_steps: Annotated[int, AtLeastOne] = Field(
        5, description="Log loss, learning rates and token efficiency every N steps."
    )
    eval_steps: Annotated[int, AtLeastOne] = Field(20, description="Validation loss every N steps (and at the end).")
    save_steps: Annotated[int, AtLeastOne] = Field(20, description="Checkpoint (for --resume) every N steps.")
    save_total_limit: Annotated[int, AtLeastOne] = Field(
        2, description="Checkpoints kept (the best model is kept apart)."
    )
    metric_for_best_model: Literal["roi_f1", "roi_f1_type", "eval_loss"] = Field(
        "roi_f1",
        description="Metric that picks the best checkpoint: val ROI-level F1 (scoring pass), the mean of it and the "
        "val defect-type accuracy (roi_f1_type: finding and naming), or val loss.",
    )
    greater_is_better: bool = Field(
        True,
        description="Whether a larger metric is better: true for roi_f1 and roi_f1_type, false for eval_loss "
        "(checked).",
    )
    lora: LoraParams = Field(LoraParams(), description="LoRA shape.")
    phase1: PhaseParams = Field(
        PhaseParams(epochs=3.0), description="Phase 1: vision tower frozen; projector + LM LoRA."
    )
    phase2: PhaseParams = Field(
        PhaseParams(epochs=1.0, vision_lora_top_n=2), description="Phase 2: + LoRA on the top N vision blocks."
    )
    phase3: PhaseParams = Field(
        PhaseParams(epochs=1.0, vision_lora_top_n=2, unfreeze_top_k=1),
        description="Phase 3: + top K vision blocks unfrozen.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        higher_is_better = METRIC_DIRECTIONS[self.metric_for_best_model]
        if self.greater_is_better != higher_is_better:
            fail(
                "greater_is_better",
                f"{self.metric_for_best_model} is better when {'higher' if higher_is_better else 'lower'}: set "
                f"train.greater_is_better: {str(higher_is_better).lower()} (otherwise the worst checkpoint is kept)",
            )
        if self.phase1.vision_lora_top_n or self.phase1.unfreeze_top_k:
            fail("phase1", "phase 1 keeps the vision tower frozen: vision_lora_top_n and unfreeze_top_k must be 0")
        if self.phase2.vision_lora_top_n < 1 or self.phase2.unfreeze_top_k:
            fail("phase2", "phase 2 needs vision_lora_top_n >= 1 and unfreeze_top_k 0")
        if self.phase3.unfreeze_top_k < 1:
            fail("phase3.unfreeze_top_k", "phase 3 needs unfreeze_top_k >= 1")
        return self

    def phase(self, number: int) -> PhaseParams:
        return getattr(self, f"phase{number}")


class TrackingParams(Section):
    """Where runs are recorded (MLflow). Credentials come from the environment, never from here."""

    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite file, http://server, ...).")
    experiment: str = Field("defectvlm", description="MLflow experiment name.")


class RegistryParams(Section):
    """Model registry (MLflow): what a registered adapter is called and what it must reach to become champion."""

    model_name: str = Field("defectvlm-adapter", description="Registered model name; each `register` adds a version.")
    gates: dict[Key, Float] = Field(
        {"roi.f1": 0.3, "image.auroc": 0.55},
        description="Minimum test metrics for promotion (keys: " + ", ".join(GATE_METRICS) + ").",
    )
    reproduce_tolerance: Annotated[Float, NonNegative] = Field(
        0.02, description="`reproduce`: largest allowed difference of a re-derived test metric."
    )
    require_export_parity: bool = Field(
        False,
        description="`promote` refuses a version without a passed `defectvlm export` parity check (tag export.parity).",
    )

    @model_validator(mode="after")
    def _check(self) -> RegistryParams:
        if not self.model_name.strip():
            fail("model_name", "must be non-empty")
        for key, value in self.gates.items():
            if key not in GATE_METRICS:
                fail(f"gates.{key}", f"unknown metric (known: {', '.join(GATE_METRICS)})")
            if not 0 <= value <= 1:
                fail(f"gates.{key}", f"must be within [0, 1], got {value}")
        return self


class DetectorParams(Section):
    """The proposal detector of the cascade (`train-detector`): trained from scratch on the VLM's train/val split."""

    backend: Literal["centernet", "ultralytics"] = Field(
        "centernet",
        description="centernet: a small CNN with a centre-heatmap head (torch, BSD; ONNX export). No download. "
        "ultralytics: a YOLO model trained from scratch with the optional extra defectvlm[ultralytics] (AGPL-3.0; "
        "offline, no weight download), exported to the same ONNX layout.",
    )
    ultralytics_model: str = Field(
        "yolo11n.yaml",
        description="ultralytics backend: the model config trained from scratch (a .yaml of the package or a file; "
        "never .pt weights).",
    )
    output_dir: str = Field(
        "runs/detector", description="Weights, detector.onnx, metrics.json and detector.json go here."
    )
    input_size: int = Field(
        512, description="Side of the square letterboxed input in pixels (a multiple of 16; of 32 for ultralytics)."
    )
    crop_size: int = Field(
        256, description="centernet: training crops of the letterboxed image (a multiple of 16, <= input_size)."
    )
    width: Annotated[int, AtLeastOne] = Field(
        16, description="centernet: channels of the first stage (the network grows from there)."
    )
    steps: Annotated[int, AtLeastOne] = Field(
        1500,
        description="Optimizer steps (fixed, not timed: same inputs give the same weights); ultralytics trains "
        "whole epochs: steps rounded up to epochs of ceil(train images / batch_size) steps.",
    )
    batch_size: Annotated[int, AtLeastOne] = Field(8, description="Crops (ultralytics: images) per step.")
    lr: Float = Field(3e-3, description="AdamW learning rate (cosine decay, 5 % warm-up).")
    confidence: Annotated[Float, Fraction] = Field(
        0.05,
        description="Proposal confidence: boxes at or above it become regions (low: the VLM rejects what is wrong).",
    )
    nms_iou: Annotated[Float, Fraction] = Field(0.5, description="Per-class non-maximum suppression IoU.")
    threads: Annotated[int, AtLeastOne] = Field(
        2, description="CPU threads for training and export (fixed: results do not depend on the machine)."
    )
    seed: int = Field(42, description="Seed of initialisation, crops and flips.")

    @model_validator(mode="after")
    def _check(self) -> DetectorParams:
        for key in ("input_size", "crop_size"):
            if getattr(self, key) < 32 or getattr(self, key) % 16:
                fail(key, f"must be a multiple of 16 and >= 32, got {getattr(self, key)}")
        if self.crop_size > self.input_size:
            fail("crop_size", f"must be <= input_size ({self.input_size}), got {self.crop_size}")
        if self.lr <= 0:
            fail("lr", f"must be > 0, got {self.lr}")
        if not self.ultralytics_model.endswith((".yaml", ".yml")):
            fail("ultralytics_model", f"must be a model config (.yaml), never weights, got {self.ultralytics_model!r}")
        if self.backend == "ultralytics" and self.input_size % 32:
            fail("input_size", f"must be a multiple of 32 with the ultralytics backend, got {self.input_size}")
        return self
