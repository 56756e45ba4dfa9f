"""What a few optimiser steps of one phase move: shared by the phase tests of the default family
and of every family, so both check the same thing the same way."""

from __future__ import annotations

import torch

from defectvlm.train.phases import classify, param_groups


def steps_move(model, family, phase, batch, steps: int) -> tuple[set[str], set[str]]:
    """(names of the parameters `steps` AdamW steps changed, names of the trainable ones).
    LoRA A only receives gradient once B has left zero, so `steps` must be at least 2."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, family, phase))
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return changed, trainable


def expected_groups(phase) -> set[tuple[str, bool]]:
    """The (group, is LoRA) pairs a phase trains: the LM's LoRA and the projector always, the top
    vision blocks' LoRA and/or full weights as the phase says."""
    expected = {("language_layers", True), ("projector", False)}
    expected |= {("vision_blocks", True)} if phase.vision_lora_top_n else set()
    expected |= {("vision_blocks", False)} if phase.unfreeze_top_k else set()
    return expected


def moved_groups(changed: set[str], family) -> set[tuple[str, bool]]:
    return {(classify(n, family).group, classify(n, family).lora) for n in changed}
