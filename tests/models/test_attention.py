"""`model.attn_implementation`: which kernel each choice runs per family, refused where it
cannot run, and the varlen vision kernel wired into the Qwen towers (checked on CPU against
sdpa with a reference kernel in place of torch's CUDA-only varlen flash attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from defectvlm.config import ModelParams
from defectvlm.errors import StepFailure
from defectvlm.models import attention
from defectvlm.models.families import FAMILIES, get_family
from defectvlm.models.loading import load_base

PACKED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def machine(monkeypatch, flash: bool, varlen: bool) -> None:
    monkeypatch.setattr(attention, "flash_attention_available", lambda: flash)
    monkeypatch.setattr(attention, "varlen_available", lambda: varlen)


@pytest.mark.parametrize("name", FAMILIES)
def test_auto_picks_the_fastest_kernel_that_runs_here(monkeypatch, name):
    family = get_family(name)
    machine(monkeypatch, flash=False, varlen=False)  # CPU
    assert attention.resolve_attn_implementation("auto", family) == "sdpa"
    machine(monkeypatch, flash=False, varlen=True)  # CUDA, no flash-attn package
    expected = "varlen_vision" if name in PACKED else "sdpa"
    assert attention.resolve_attn_implementation("auto", family) == expected
    machine(monkeypatch, flash=True, varlen=True)
    assert attention.resolve_attn_implementation("auto", family) == "flash_attention_2"
    assert attention.resolve_attn_implementation("sdpa", family) == "sdpa"
    assert attention.resolve_attn_implementation("eager", family) == "eager"


def test_varlen_vision_is_refused_without_cuda_and_for_a_tiled_tower(monkeypatch):
    machine(monkeypatch, flash=False, varlen=False)
    with pytest.raises(StepFailure, match="varlen_vision needs a CUDA GPU"):
        load_base(ModelParams(family="qwen2_vl", name_or_path="tiny-random", attn_implementation="varlen_vision"))
    machine(monkeypatch, flash=True, varlen=True)
    with pytest.raises(StepFailure, match="internvl's tower sees fixed-size tiles"):
        attention.resolve_attn_implementation("varlen_vision", get_family("internvl"))
    assert attention.resolve_attn_implementation("varlen_vision", get_family("qwen3_vl")) == "varlen_vision"


def reference_kernel(calls: list):
    """torch's varlen_attn semantics on CPU: attention within each [cu[i], cu[i+1]) segment."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        calls.append(len(cu_q) - 1)
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            seg = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # (heads, tokens, dim)
            out[start:end] = F.scaled_dot_product_attention(*seg, scale=scale).transpose(0, 1)
        return out

    return kernel


@pytest.mark.parametrize("name", PACKED)
def test_varlen_vision_runs_the_tower_through_the_varlen_kernel_with_sdpas_result(monkeypatch, name):
    calls: list[int] = []
    machine(monkeypatch, flash=False, varlen=True)
    monkeypatch.setattr(attention, "_kernel", reference_kernel(calls))
    params = {"family": name, "name_or_path": "tiny-random", "min_pixels": 56 * 56, "max_pixels": 224 * 224}
    varlen, processor = load_base(ModelParams(**params, attn_implementation="varlen_vision"))
    sdpa, _ = load_base(ModelParams(**params, attn_implementation="sdpa"))
    assert varlen.config.vision_config._attn_implementation == attention.VARLEN_KERNEL
    assert varlen.config.text_config._attn_implementation == "sdpa"

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((200, 120), (96, 160))]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "defect?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        expected = sdpa(**inputs).logits
        got = varlen(**inputs).logits
    n_blocks = len(varlen.get_submodule(get_family(name).vision_blocks))
    assert len(calls) == n_blocks and all(n >= 2 for n in calls)  # every block, both images packed in one call
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
