"""Base models and processors: the offline tiny model (`tiny`, alias `tiny-pretrained`: the
weights `python -m defectvlm.models.pretrain_tiny` writes into the package; `tiny-random`:
random weights, any family), or a checkpoint from a local path or hub id."""

from __future__ import annotations

import torch

from defectvlm.config import ModelParams
from defectvlm.errors import StepFailure
from defectvlm.models.attention import model_attn_implementation, resolve_attn_implementation, use_choice
from defectvlm.models.families import get_family

TINY_NAMES = ("tiny", "tiny-random", "tiny-pretrained")


def load_base(model: ModelParams, qlora: bool = False):
    """(model, processor) for `model.name_or_path` with the configured pixel budget and attention."""
    choice = resolve_attn_implementation(model.attn_implementation, get_family(model.family))
    base, processor = _load(model, qlora, model_attn_implementation(choice))
    use_choice(base, choice)
    return base, processor


def _load(model: ModelParams, qlora: bool, attn_implementation: str):
    family = get_family(model.family)
    if model.name_or_path == "tiny-random" and model.family != "qwen2_5_vl":
        if qlora:
            raise StepFailure("train.qlora needs a real checkpoint on a CUDA GPU; the tiny model trains in fp32")
        from defectvlm.models.tiny_families import build_tiny_family

        return build_tiny_family(model.family, model.min_pixels, model.max_pixels, attn_implementation)
    if model.name_or_path in TINY_NAMES:
        if model.family != "qwen2_5_vl":
            raise StepFailure(
                f"model.name_or_path '{model.name_or_path}' is a qwen2_5_vl model; set model.family: qwen2_5_vl"
            )
        if qlora:
            raise StepFailure("train.qlora needs a real checkpoint on a CUDA GPU; the tiny model trains in fp32")
        from defectvlm.models.tiny import build_tiny, load_pretrained_tiny

        if model.name_or_path == "tiny-random":
            return build_tiny(model.min_pixels, model.max_pixels)
        return load_pretrained_tiny(model.min_pixels, model.max_pixels)

    import transformers

    kwargs = {
        "dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        "attn_implementation": attn_implementation,
    }
    if qlora:
        if not torch.cuda.is_available():
            raise StepFailure(
                "train.qlora loads the base in 4 bit with bitsandbytes, which needs a CUDA GPU; none here"
            )
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model_class = getattr(transformers, family.model_class)
    base = model_class.from_pretrained(model.name_or_path, **kwargs)
    processor = transformers.AutoProcessor.from_pretrained(
        model.name_or_path, **family.processor_kwargs(model.min_pixels, model.max_pixels)
    )
    if qlora:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)
    return base, processor
