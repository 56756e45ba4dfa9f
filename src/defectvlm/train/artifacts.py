"""A phase's output directory describes itself: `best/` holds the LoRA adapter (PEFT files),
the trained non-LoRA weights (projector, unfrozen vision blocks), the processor, and
`phase.json` (family, base, phase, the phase it started from). The next phase and the
evaluation load exactly this."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from defectvlm.errors import StepFailure
from defectvlm.io import write_json_atomic
from defectvlm.models.families import Family
from defectvlm.train.phases import canonical, classify

ADAPTER_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora.safetensors"
PHASE_FILE = "phase.json"


def trained_tensors(model: PeftModel, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA state dict as PEFT saves it, trained non-LoRA weights by base-model name), on CPU.
    Under ZeRO-3 call this inside deepspeed.zero.GatheredParameters."""
    lora = {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    non_lora = {
        canonical(name): parameter.detach().cpu().clone().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not classify(name, family).lora
    }
    return lora, non_lora


def save_trained(
    directory: Path,
    model: PeftModel,
    lora: dict[str, torch.Tensor],
    non_lora: dict[str, torch.Tensor],
    processor,
    phase_info: dict,
) -> None:
    empty = [k for k, v in lora.items() if v.numel() == 0]
    if not lora or empty:
        raise StepFailure(
            f"refusing to save an empty adapter ({len(empty)} empty tensors): gather ZeRO-3 weights first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(directory))
    save_file(lora, str(directory / ADAPTER_FILE))
    save_file(non_lora, str(directory / NON_LORA_FILE))
    processor.save_pretrained(str(directory))
    write_json_atomic(directory / PHASE_FILE, phase_info)


def load_trained(model: PeftModel, directory: Path) -> dict[str, int]:
    """Load a phase's adapter and non-LoRA weights into `model` (whose LoRA targets must cover
    the saved ones). Every saved tensor must find its place; returns what was loaded."""
    lora = load_file(str(directory / ADAPTER_FILE))
    result = set_peft_model_state_dict(model, lora)
    if result.unexpected_keys:
        raise StepFailure(f"{directory}: {len(result.unexpected_keys)} adapter tensors have no place in this model")
    non_lora = load_file(str(directory / NON_LORA_FILE))
    parameters = {canonical(name): parameter for name, parameter in model.named_parameters()}
    missing = sorted(set(non_lora) - set(parameters))
    if missing:
        raise StepFailure(f"{directory}: weights with no place in this model: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in non_lora.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    return {"lora_tensors": len(lora), "non_lora_tensors": len(non_lora)}


def read_phase_info(directory: Path) -> dict:
    path = directory / PHASE_FILE
    if not path.exists():
        raise StepFailure(f"{path} not found: {directory} is not a phase's output")
    return json.loads(path.read_text(encoding="utf-8"))
