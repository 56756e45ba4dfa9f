"""Which attention kernel the model runs (`model.attn_implementation`).

- `flash_attention_2`: the flash-attn package everywhere (CUDA only);
- `varlen_vision`: the language model on sdpa, the vision tower on torch's varlen flash
  attention (`torch.nn.attention.varlen.varlen_attn`, CUDA only): one call per layer over all
  the packed windows/images, where sdpa makes one call per window (the GPU benchmark's
  `--vision-attn varlen`). Only for families whose tower packs its inputs into one sequence
  (`Family.vision_packed`: the Qwen towers); InternVL's tower sees fixed-size tiles;
- `auto`: flash_attention_2 where flash-attn is installed on CUDA, else varlen_vision on CUDA
  for a packed tower, else sdpa;
- `sdpa`, `eager`: as asked.
"""

from __future__ import annotations

import importlib.util

import torch

from defectvlm.errors import StepFailure
from defectvlm.models.families import Family

VARLEN_VISION = "varlen_vision"
# The name registered with transformers: "flash" in it makes the Qwen towers pass cu_seqlens.
VARLEN_KERNEL = "flash_varlen_torch"


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def varlen_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attn_implementation(requested: str, family: Family | None = None) -> str:
    """The choice to run: flash_attention_2 | varlen_vision | sdpa | eager (see the module doc)."""
    packed = family is not None and family.vision_packed
    if requested == "auto":
        if flash_attention_available():
            return "flash_attention_2"
        return VARLEN_VISION if packed and varlen_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attention_available():
        raise StepFailure(
            "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; use auto or sdpa"
        )
    if requested == VARLEN_VISION:
        if family is not None and not family.vision_packed:
            raise StepFailure(
                f"model.attn_implementation: varlen_vision is for vision towers that pack images into one "
                f"sequence (the Qwen families); {family.name}'s tower sees fixed-size tiles: use auto or sdpa"
            )
        if not varlen_available():
            raise StepFailure(
                "model.attn_implementation: varlen_vision needs a CUDA GPU (torch's varlen flash attention); "
                "use auto or sdpa"
            )
    return requested


def model_attn_implementation(choice: str) -> str:
    """What the model is built with (the language model's kernel); the vision tower follows
    with `use_choice` after building."""
    return "sdpa" if choice == VARLEN_VISION else choice


def use_choice(model, choice: str) -> None:
    """Switch the vision tower to the varlen kernel when `choice` is varlen_vision."""
    if choice != VARLEN_VISION:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_KERNEL, varlen_attention)
    model.set_attn_implementation({"vision_config": VARLEN_KERNEL})


def _kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def varlen_attention(
    module, query, key, value, attention_mask=None, cu_seq_lens_q=None, max_length_q=None, scaling=None, **kwargs
):
    """transformers' flash-attention calling convention over the varlen kernel (vision tower:
    no mask, not causal, queries and keys in the same windows). query/key/value come as
    (1, heads, tokens, dim); the kernel and transformers' flash output are (tokens, heads, dim)."""
    if cu_seq_lens_q is None:
        raise StepFailure(f"{VARLEN_VISION}: {type(module).__name__} did not pass cu_seqlens (not a packed tower)")
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    cu = cu_seq_lens_q.to(torch.int32)
    if max_length_q is None:
        max_length_q = int((cu[1:] - cu[:-1]).max())
    return _kernel(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling).unsqueeze(0), None
