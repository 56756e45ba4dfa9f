"""Real sizes, no weights: each family's published 7B/8B configuration built on the meta device,
wrapped for each phase, and its trainable parameters counted per group.

The sizes are the published config.json values (Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct,
Qwen3-VL-8B-Instruct, InternVL3-8B-hf) that decide parameter shapes; the table in docs/training.md is this
module's output:

    python -m defectvlm.models.sizes
"""

from __future__ import annotations

import torch
import transformers

from defectvlm.config import LoraParams, params_from_dict
from defectvlm.models.families import get_family
from defectvlm.train.phases import apply_phase, check_invariants, trainable_table

_QWEN2_LM = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
PUBLISHED = {
    "qwen2_vl": (
        "Qwen/Qwen2-VL-7B-Instruct",
        {
            "text_config": _QWEN2_LM,
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584},
            "tie_word_embeddings": False,
        },
    ),
    "qwen2_5_vl": (
        "Qwen/Qwen2.5-VL-7B-Instruct",
        {
            "text_config": _QWEN2_LM,
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen3_vl": (
        "Qwen/Qwen3-VL-8B-Instruct",
        {
            "text_config": {
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 151936,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5000000.0,
                    "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "depth": 27,
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_heads": 16,
                "out_hidden_size": 4096,
                "patch_size": 16,
                "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [8, 16, 24],
            },
            "tie_word_embeddings": False,
        },
    ),
    "internvl": (
        "OpenGVLab/InternVL3-8B-hf",
        {
            "text_config": {
                "model_type": "qwen2",
                **{k: v for k, v in _QWEN2_LM.items() if k != "rope_parameters"},
                "vocab_size": 151674,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            "vision_config": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "attention_bias": True,
                "image_size": [448, 448],
                "patch_size": [14, 14],
            },
            "downsample_ratio": 0.5,
            "tie_word_embeddings": False,
        },
    ),
}
GROUPS = ("lm_lora", "projector", "vision_lora", "vision_blocks")


def build_on_meta(name: str) -> torch.nn.Module:
    """The family's published architecture with no storage behind its parameters."""
    family = get_family(name)
    model_class = getattr(transformers, family.model_class)
    config = model_class.config_class(**PUBLISHED[name][1])
    with torch.device("meta"):
        return model_class(config)


def phase_counts(name: str, lora: LoraParams | None = None) -> list[dict]:
    """Per phase (the default params): total and trainable parameters, per optimizer group,
    the modules with LoRA and the unfrozen vision blocks; the phase invariants checked."""
    family = get_family(name)
    train = params_from_dict({}).train
    lora = lora or train.lora
    rows = []
    for number in (1, 2, 3):
        phase = train.phase(number)
        model = apply_phase(build_on_meta(name), family, phase, lora)
        check_invariants(model, family, number, phase)
        table = {(r["group"], r["kind"]): r for r in trainable_table(model, family)}
        lora_modules = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n})
        rows.append(
            {
                "phase": number,
                "total": sum(r["total"] for r in table.values()),
                "trainable": sum(r["trainable"] for r in table.values()),
                "lm_lora": table.get(("language_layers", "lora"), {}).get("trainable", 0),
                "vision_lora": table.get(("vision_blocks", "lora"), {}).get("trainable", 0),
                "projector": table[("projector", "base")]["trainable"],
                "vision_blocks": table.get(("vision_blocks", "base"), {}).get("trainable", 0),
                "vision_frozen": table[("vision_other", "base")]["trainable"] == 0,
                "lora_modules": lora_modules,
            }
        )
    return rows


def markdown_table() -> str:
    lines = [
        "| family (published config) | phase | total params | trainable | LM LoRA | projector | vision LoRA | "
        "unfrozen vision blocks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (checkpoint, _) in PUBLISHED.items():
        for row in phase_counts(name):
            lines.append(
                f"| {name} ({checkpoint}) | {row['phase']} | {row['total']:,} | {row['trainable']:,} | "
                f"{row['lm_lora']:,} | {row['projector']:,} | {row['vision_lora']:,} | {row['vision_blocks']:,} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
