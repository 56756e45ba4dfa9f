"""Phases as data: which parameters train, at which learning rate, and the checks that the
model really is in that state before a step is taken.

- phase 1: vision tower frozen; projector fully trained (`lr_proj`); LoRA on the language
  model's attention and MLP (`lr_lm`).
- phase 2: + LoRA on the top `vision_lora_top_n` vision blocks (`lr_vision_lora`).
- phase 3: + the top `unfreeze_top_k` vision blocks fully trained (`lr_vision`).

LoRA targets are regexes anchored at the family's module paths: Qwen's vision blocks reuse
the names gate_proj/up_proj/down_proj, so a bare name list would put LoRA on the vision
tower. The patch embedding, token embeddings and the LM head never train.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from defectvlm.config import LoraParams, PhaseParams
from defectvlm.models.families import Family

PEFT_PREFIX = "base_model.model."


class PhaseInvariantError(AssertionError):
    """The model's trainable parameters are not what the phase says."""


@dataclass(frozen=True)
class ParamInfo:
    group: str  # projector | vision_blocks | vision_other | language_layers | other
    lora: bool
    block: int | None  # vision block index


def canonical(name: str) -> str:
    """A parameter's name in the base model (PEFT's prefix and base_layer removed)."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def classify(name: str, family: Family) -> ParamInfo:
    name = canonical(name)
    lora = ".lora_" in name
    if any(name.startswith(projector + ".") for projector in family.projectors):
        return ParamInfo("projector", lora, None)
    if name.startswith(family.vision_blocks + "."):
        block = int(name[len(family.vision_blocks) + 1 :].split(".", 1)[0])
        return ParamInfo("vision_blocks", lora, block)
    if name.startswith(family.vision_tower + "."):
        return ParamInfo("vision_other", lora, None)
    if name.startswith(family.language_layers + "."):
        return ParamInfo("language_layers", lora, None)
    return ParamInfo("other", lora, None)


def vision_block_count(model: torch.nn.Module, family: Family) -> int:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return len(base.get_submodule(family.vision_blocks))


def lora_targets(family: Family, n_blocks: int, top_n: int) -> str:
    """One regex (PEFT full-matches it against module names) for the phase's LoRA targets."""
    lm = rf"{re.escape(family.language_layers)}\.\d+\.({family.lm_lora_leaves})"
    if not top_n:
        return lm
    blocks = "|".join(str(i) for i in range(n_blocks - top_n, n_blocks))
    vision = rf"{re.escape(family.vision_blocks)}\.({blocks})\.({family.vision_lora_leaves})"
    return f"({lm})|({vision})"


def apply_phase(model: torch.nn.Module, family: Family, phase: PhaseParams, lora: LoraParams) -> PeftModel:
    """Wrap the base model with the phase's LoRA and set which base weights train."""
    n_blocks = vision_block_count(model, family)
    if phase.vision_lora_top_n > n_blocks or phase.unfreeze_top_k > n_blocks:
        raise PhaseInvariantError(f"the model has {n_blocks} vision blocks; the phase asks for more")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(family, n_blocks, phase.vision_lora_top_n),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():
        info = classify(name, family)
        if info.group == "projector" and not info.lora:
            parameter.requires_grad_(True)
        elif info.group == "vision_blocks" and not info.lora and info.block >= n_blocks - phase.unfreeze_top_k:
            parameter.requires_grad_(True)
    return peft_model


def param_groups(model: PeftModel, family: Family, phase: PhaseParams) -> list[dict]:
    """Optimizer groups, one per learning rate; a trainable parameter outside them is an error."""
    groups: dict[str, list[torch.nn.Parameter]] = defaultdict(list)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        info = classify(name, family)
        if info.lora and info.group == "language_layers":
            groups["lm_lora"].append(parameter)
        elif info.lora and info.group == "vision_blocks":
            groups["vision_lora"].append(parameter)
        elif info.group == "projector" and not info.lora:
            groups["projector"].append(parameter)
        elif info.group == "vision_blocks":
            groups["vision_blocks"].append(parameter)
        else:
            raise PhaseInvariantError(f"{canonical(name)} is trainable but belongs to no group of this phase")
    rates = {
        "lm_lora": phase.lr_lm,
        "vision_lora": phase.lr_vision_lora,
        "projector": phase.lr_proj,
        "vision_blocks": phase.lr_vision,
    }
    return [{"name": key, "params": params, "lr": rates[key]} for key, params in sorted(groups.items())]


def trainable_table(model: torch.nn.Module, family: Family) -> list[dict]:
    """Per module group and kind (LoRA or base weights): trainable and total parameter counts."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for name, parameter in model.named_parameters():
        info = classify(name, family)
        row = rows[(info.group, "lora" if info.lora else "base")]
        row[1] += parameter.numel()
        if parameter.requires_grad:
            row[0] += parameter.numel()
    return [
        {"group": group, "kind": kind, "trainable": trainable, "total": total}
        for (group, kind), (trainable, total) in sorted(rows.items())
    ]


def check_invariants(model: PeftModel, family: Family, phase_number: int, phase: PhaseParams) -> None:
    """Raise PhaseInvariantError unless exactly the phase's parameters are trainable."""
    n_blocks = vision_block_count(model, family)
    lora_blocks, unfrozen_blocks = set(), set()
    projector_total = projector_trainable = 0
    for name, parameter in model.named_parameters():
        info = classify(name, family)
        trainable = parameter.requires_grad
        where = canonical(name)
        if info.group in ("vision_other", "other") and trainable:
            raise PhaseInvariantError(f"phase {phase_number}: {where} must stay frozen")
        if info.group == "language_layers" and trainable != info.lora:
            raise PhaseInvariantError(f"phase {phase_number}: {where}: only LoRA trains in the language model")
        if info.group == "projector":
            projector_total += 1
            projector_trainable += trainable
        if info.group == "vision_blocks" and trainable:
            (lora_blocks if info.lora else unfrozen_blocks).add(info.block)
    if projector_trainable != projector_total:
        raise PhaseInvariantError(f"phase {phase_number}: the projector must be fully trainable")
    expected_lora = set(range(n_blocks - phase.vision_lora_top_n, n_blocks)) if phase.vision_lora_top_n else set()
    expected_unfrozen = set(range(n_blocks - phase.unfreeze_top_k, n_blocks)) if phase.unfreeze_top_k else set()
    if lora_blocks != expected_lora:
        raise PhaseInvariantError(
            f"phase {phase_number}: vision LoRA in blocks {sorted(lora_blocks)}, expected {sorted(expected_lora)}"
        )
    if unfrozen_blocks != expected_unfrozen:
        raise PhaseInvariantError(
            f"phase {phase_number}: unfrozen vision blocks {sorted(unfrozen_blocks)}, "
            f"expected {sorted(expected_unfrozen)}"
        )
