"""What the recipe's `setup()` builds, one function each: the phase's folder and starting
point, the model with the phase's LoRA, the data of the phase (train/val, classes, the
prompt the adapter carries) and the DeepSpeed config with its "auto" values filled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.runtime.config import DeepSpeedConfig

from defectvlm.config import Params, PhaseParams
from defectvlm.data.sft import load_knowledge, load_templates
from defectvlm.errors import StepFailure
from defectvlm.io import read_json_file, read_jsonl
from defectvlm.models.families import get_family
from defectvlm.models.loading import load_base
from defectvlm.train.artifacts import load_trained, prompt_config
from defectvlm.train.data import SftDataset
from defectvlm.train.phases import apply_phase, check_invariants

BEST = "best"


def phase_dir(params: Params, phase: int) -> Path:
    return Path(params.train.output_dir) / f"phase{phase}"


def starting_point(params: Params, phase: int) -> Path | None:
    """The best/ of the last earlier phase that ran (None for phase 1)."""
    for earlier in range(phase - 1, 0, -1):
        best = phase_dir(params, earlier) / BEST
        if params.train.phase(earlier).enabled:
            if not best.exists():
                raise StepFailure(
                    f"phase {phase} starts from phase {earlier}, but {best} does not exist: train it first"
                )
            return best
    return None


def deepspeed_config(params: Params, world: int) -> dict:
    train = params.train
    config = read_json_file(train.deepspeed, "train.deepspeed")
    if not isinstance(config, dict):
        raise StepFailure(f"{train.deepspeed} (train.deepspeed): a DeepSpeed config is a JSON object")
    filled = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = precision == "bf16" and torch.cuda.is_available()
    config.setdefault("steps_per_print", 10**9)
    try:  # DeepSpeed's own checks, before any model is built
        DeepSpeedConfig(config)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise StepFailure(
            f"{train.deepspeed} (train.deepspeed) is not a valid DeepSpeed config: {exc}. "
            "Fix it (configs/deepspeed/*.json are working examples) or point train.deepspeed at another file"
        ) from None
    return config


def build_model(params: Params, phase_number: int, phase: PhaseParams):
    """(the PEFT model in the phase's trainable state, processor, family, the best/ it starts from)."""
    family = get_family(params.model.family)
    base, processor = load_base(params.model, qlora=params.train.qlora)
    model = apply_phase(base, family, phase, params.train.lora)
    start = starting_point(params, phase_number)
    if start is not None:
        load_trained(model, start)
    if params.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the frozen vision tower's input require grad: the whole tower
        # would be recomputed and back-propagated for nothing (4x slower steps on an H100)
        vision = model.get_base_model().get_submodule(family.vision_tower)
        if hasattr(vision, "get_input_embeddings"):
            vision.get_input_embeddings()._forward_hooks.clear()
    check_invariants(model, family, phase_number, phase)
    return model, processor, family, start


def load_split(params: Params, sft_dir: Path, split: str, processor) -> tuple[SftDataset, int]:
    """The split's samples up to train.max_length tokens, and how many were longer."""
    samples = read_jsonl(sft_dir / f"{split}.jsonl")
    if samples and "meta" not in samples[0]:
        raise StepFailure(f"{sft_dir}/{split}.jsonl is not in the native format: run build-sft with --format native")
    dataset = SftDataset(samples, processor)
    keep = [i for i, item in enumerate(dataset.items) if item.length <= params.train.max_length]
    skipped = len(dataset.items) - len(keep)
    dataset.items = [dataset.items[i] for i in keep]
    dataset.samples = [dataset.samples[i] for i in keep]
    return dataset, skipped


@dataclass
class PhaseData:
    """A phase's data: train and val, the classes, and the prompt its adapter carries."""

    train: SftDataset
    val: SftDataset
    skipped: dict[str, int]  # samples over train.max_length, per split
    classes: list[str]
    prompt: dict  # best/prompt.json

    @classmethod
    def load(cls, params: Params, sft_dir: Path, processor) -> PhaseData:
        train, skipped_train = load_split(params, sft_dir, "train", processor)
        val, skipped_val = load_split(params, sft_dir, "val", processor)
        summary = sft_dir / "sft_summary.json"
        classes = json.loads(summary.read_text(encoding="utf-8"))["classes"] if summary.exists() else []
        templates, knowledge = load_templates(params.sft), load_knowledge(params.sft)
        prompt = prompt_config(params.sft, templates, knowledge, classes, train.samples)
        return cls(train, val, {"train": skipped_train, "val": skipped_val}, classes, prompt)


def phase_info(params: Params, phase_number: int, start: Path | None, family, step: int | None = None) -> dict:
    """phase.json: what a phase's output (and its best/) was trained from and how."""
    return {
        "phase": phase_number,
        "enabled": True,
        "family": family.name,
        "base": params.model.name_or_path,
        "starts_from": str(start) if start else None,
        "step": step,
        "min_pixels": params.model.min_pixels,
        "max_pixels": params.model.max_pixels,
        "phase_params": params.train.phase(phase_number).model_dump(),
        "lora": params.train.lora.model_dump(),
    }
