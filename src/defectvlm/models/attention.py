"""Which attention kernel the model runs (`model.attn_implementation`)."""

from __future__ import annotations

import importlib.util

import torch

from defectvlm.errors import StepFailure


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str) -> str:
    """auto -> flash_attention_2 on CUDA when flash-attn is installed, else sdpa; the others as asked."""
    if requested == "auto":
        return "flash_attention_2" if flash_attention_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attention_available():
        raise StepFailure(
            "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; use auto or sdpa"
        )
    return requested
