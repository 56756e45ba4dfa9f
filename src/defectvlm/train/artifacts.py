"""A phase's output directory describes itself: `best/` is a standard PEFT adapter, so
`PeftModel.from_pretrained(base, best)` restores every trained weight, plus the processor,
`phase.json` (family, base, phase, the phase it started from) and `prompt.json` (the
prompt's templates, glossary and classes, and the training boxes' sizes). The next phase,
evaluation, registration, predict and export load exactly this.

Modules trained in full (the projector, unfrozen vision blocks) are PEFT `modules_to_save`.
An unfrozen block that also carries LoRA is saved with the LoRA folded into its weights and
kept out of the LoRA targets (`exclude_modules`), since PEFT cannot nest LoRA inside a module
it saves whole; the function is the same, and a next phase that puts LoRA there starts it at zero.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from defectvlm.config import SftParams
from defectvlm.errors import StepFailure
from defectvlm.io import write_json_atomic
from defectvlm.models.families import Family
from defectvlm.train.phases import PEFT_PREFIX, canonical, classify

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PHASE_FILE = "phase.json"
PROMPT_FILE = "prompt.json"
ADAPTER_NAME = "default"


def fully_trained_modules(model: PeftModel, family: Family) -> list[str]:
    """Module paths (in the base model) whose own weights train: the projector, unfrozen blocks."""
    modules = set()
    base = model.get_base_model()
    for name, parameter in model.named_parameters():
        info = classify(name, family)
        if not parameter.requires_grad or info.lora:
            continue
        if info.group == "projector":  # Qwen3-VL has deepstack mergers beside the main one
            projector = next(p for p in family.projectors if canonical(name).startswith(p + "."))
            if isinstance(base.get_submodule(projector), (torch.nn.ModuleList, torch.nn.ModuleDict)):
                # PEFT saves whole modules but refuses containers: Qwen3-VL's deepstack mergers one by one
                projector += "." + canonical(name).removeprefix(projector + ".").split(".")[0]
            modules.add(projector)
        elif info.group == "vision_blocks":
            modules.add(f"{family.vision_blocks}.{info.block}")
        else:
            raise StepFailure(f"{canonical(name)} trains but is neither LoRA, the projector nor a vision block")
    return sorted(modules)


def _inside(key: str, modules: list[str]) -> bool:
    name = canonical(key)
    return any(name.startswith(module + ".") for module in modules)


def trained_tensors(model: PeftModel, family: Family) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the adapter's state dict as PEFT loads it, the modules saved whole), on CPU.
    Under ZeRO-3 call this inside deepspeed.zero.GatheredParameters."""
    modules = fully_trained_modules(model, family)
    state = {
        key: tensor.detach().cpu().clone().contiguous()
        for key, tensor in get_peft_model_state_dict(model).items()
        if not _inside(key, modules)
    }
    base = model.get_base_model()
    for module_path in modules:
        module = base.get_submodule(module_path)
        for name, parameter in module.named_parameters():
            if ".lora_" in name:
                continue
            tensor = parameter.detach()
            if name.endswith(".base_layer.weight"):  # fold this layer's LoRA into the saved weight
                layer = module.get_submodule(name.removesuffix(".base_layer.weight"))
                delta = layer.get_delta_weight(ADAPTER_NAME).detach()
                tensor = (tensor.float() + delta.float()).to(tensor.dtype)
            state[PEFT_PREFIX + canonical(f"{module_path}.{name}")] = tensor.cpu().clone().contiguous()
    return state, modules


def adapter_config(model: PeftModel, modules: list[str], family: Family):
    """The training LoraConfig with the fully trained modules saved whole and out of LoRA's reach."""
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.modules_to_save = modules or None
    blocks = [m for m in modules if not any(m == p or m.startswith(p + ".") for p in family.projectors)]
    config.exclude_modules = "|".join(rf"{re.escape(m)}\..+" for m in blocks) or None
    config.inference_mode = True
    return config


def prompt_config(sft: SftParams, templates: dict, knowledge: dict, classes: list[str], train: list[dict]) -> dict:
    """What predict needs to build the evaluation prompt for new images, and the size of the
    default windows (median training positive, as fractions of the frame)."""
    shapes = [
        ((r["box"][2] - r["box"][0]) / s["meta"]["frame"][0], (r["box"][3] - r["box"][1]) / s["meta"]["frame"][1])
        for s in train
        for r in s["meta"]["regions"]
        if r["source"] == "positive"
    ]
    per_image = Counter(len(s["meta"]["regions"]) for s in train)
    return {
        "sft": {
            k: getattr(sft, k) for k in ("language", "summary", "region_encoding", "crop_size", "regions_per_prompt")
        },
        "classes": classes,
        "templates": templates,
        "knowledge": {c: knowledge[c] for c in classes},
        "window": {
            "width_fraction": round(statistics.median(w for w, _ in shapes), 4) if shapes else 0.25,
            "height_fraction": round(statistics.median(h for _, h in shapes), 4) if shapes else 0.25,
            "max_regions": sft.regions_per_prompt or (max(per_image) if per_image else 8),
        },
    }


def save_trained(
    directory: Path,
    model: PeftModel,
    state: dict[str, torch.Tensor],
    modules: list[str],
    family: Family,
    processor,
    phase_info: dict,
    prompt: dict | None = None,
) -> None:
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise StepFailure(
            f"refusing to save an empty adapter ({len(empty)} empty tensors): gather ZeRO-3 weights first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    adapter_config(model, modules, family).save_pretrained(str(directory))
    save_file(state, str(directory / ADAPTER_FILE))
    processor.save_pretrained(str(directory))
    write_json_atomic(directory / PHASE_FILE, phase_info)
    if prompt is not None:
        write_json_atomic(directory / PROMPT_FILE, prompt)


def load_trained(model: PeftModel, directory: Path) -> dict[str, int]:
    """Load a phase's adapter into a training model (`apply_phase`'s, whose LoRA targets must
    cover the saved ones): LoRA tensors into LoRA, modules saved whole into the base weights.
    Every saved tensor must find its place; returns what was loaded."""
    saved = load_file(str(directory / ADAPTER_FILE))
    lora_params = {k: p for k, p in get_peft_model_state_dict(model).items()}
    parameters = {canonical(name): parameter for name, parameter in model.named_parameters()}
    homeless = [k for k in saved if k not in lora_params and canonical(k) not in parameters]
    if homeless:
        raise StepFailure(f"{directory}: {len(homeless)} saved tensors have no place in this model: {homeless[:3]}")
    named = dict(model.named_parameters())
    lora_names = {_lora_parameter_name(k): k for k in saved if k in lora_params}
    with torch.no_grad():
        for name, key in lora_names.items():
            named[name].copy_(saved[key].to(named[name].dtype))
        full = [k for k in saved if k not in lora_params]
        for key in full:
            target = parameters[canonical(key)]
            target.copy_(saved[key].to(target.dtype))
    return {"lora_tensors": len(lora_names), "full_tensors": len(full)}


def _lora_parameter_name(key: str) -> str:
    """PEFT's saved key (no adapter name) -> the parameter's name in the PEFT model."""
    return re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER_NAME}.", key)


def read_phase_info(directory: Path) -> dict:
    path = directory / PHASE_FILE
    if not path.exists():
        raise StepFailure(f"{path} not found: {directory} is not a phase's output")
    return json.loads(path.read_text(encoding="utf-8"))
