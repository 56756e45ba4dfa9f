"""Phase-1 training throughput on one GPU: the Qwen2.5-VL-7B architecture, random bf16 weights.

    python benchmarks/bench_train_gpu.py [--batch-size 4] [--steps 10] [--warmup 3] [--grad-ckpt]
        [--lora-dropout 0.05] [--vision-attn sdpa|varlen] [--vision-no-grad] [--json result.json]

Each sample is one 1344x1024 image (1024 px short side; Qwen2.5-VL's resize gives a 74x96
patch grid, 1776 image tokens) and 300 text tokens, the last 40 of them the supervised answer,
as in the SFT data. The model is set up as `defectvlm train --phase 1` sets it up: apply_phase,
param_groups, torch AdamW, DeepSpeed ZeRO-2 from configs/deepspeed/zero2.json, and each step is
engine(**batch).loss, engine.backward, engine.step. Goal (issue): MFU >= 40% on one H100.

FLOPs per step (gradient-checkpointing recompute is never counted):
- forward: 2 x (matrix-shaped weights) x (tokens they see) for every linear layer, LoRA
  included, + attention 4 x S^2 x width per layer and sequence (the full square, not halved
  for causal masks; the vision tower's windowed layers count their windows);
- model FLOPs, "6N-style" (what papers report): 3 x the forward of everything;
- hardware-useful FLOPs: the frozen vision tower forward only (it sits before the trainable
  projector); projector forward + weight gradients; language model forward + activation
  gradients (LoRA is in every layer, so they flow through all of it, lm_head included) + LoRA
  weight gradients; attention backward = 2 x its forward.
MFU = FLOPs / step time / 989 TFLOP/s (H100 SXM dense bf16).

Knobs beyond the recipe: --vision-attn varlen runs each vision layer's attention windows in one
torch varlen flash-attention call (transformers' sdpa path makes one call per 8x8-patch window);
--vision-no-grad drops the requires-grad hook that gradient_checkpointing_enable (through
enable_input_require_grads) also puts on the frozen vision tower's patch embedding, which
otherwise makes the whole tower back-propagate (and recompute) for nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12
IMAGE_WIDTH, IMAGE_HEIGHT = 1344, 1024
TEXT_TOKENS, ANSWER_TOKENS, PROMPT_PREFIX = 300, 40, 20
FIRST_SPECIAL_ID = 151643  # Qwen2's special tokens start here; random text stays below

# Published Qwen2.5-VL-7B-Instruct sizes.
TEXT_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
VISION_7B = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}


@dataclass(frozen=True)
class Shape:
    """One sample's geometry: the image's patch grid and the LM sequence."""

    grid_h: int
    grid_w: int
    merge: int
    text_tokens: int

    @property
    def patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def image_tokens(self) -> int:
        return self.patches // self.merge**2

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_tokens


def sample_shape(config, width: int, height: int, text_tokens: int) -> Shape:
    from defectvlm.models.families import get_family

    vision = config.vision_config
    side = vision.patch_size * vision.spatial_merge_size
    w, h = get_family("qwen2_5_vl").resized(width, height, min_pixels=side * side, max_pixels=4 * width * height)
    return Shape(h // vision.patch_size, w // vision.patch_size, vision.spatial_merge_size, text_tokens)


def build_model(attn: str):
    """The 7B architecture, randomly initialised directly in bf16 on the GPU."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=TEXT_7B, vision_config=VISION_7B, tie_word_embeddings=False)
    config.use_cache = config.text_config.use_cache = False
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def varlen_attention(module, query, key, value, attention_mask=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' flash-attention calling convention over torch's varlen flash attention
    (vision tower only: no mask, not causal, equal query and key windows)."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (tokens, heads, dim)
    cu = cu_seq_lens_q.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q)).unsqueeze(0), None


def use_varlen_vision_attention(model) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("flash_varlen", varlen_attention)  # "flash" selects the cu_seqlens path
    model.set_attn_implementation({"vision_config": "flash_varlen"})


def synthetic_batch(config, shape: Shape, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids with the image's pad tokens in place, pixels, grid; loss on the answer only."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch_size):
        text = torch.randint(0, FIRST_SPECIAL_ID, (shape.text_tokens - 2,), generator=g)
        image = torch.full((shape.image_tokens,), config.image_token_id)
        start, end = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
        rows.append(torch.cat([text[:PROMPT_PREFIX], start, image, end, text[PROMPT_PREFIX:]]))
    input_ids = torch.stack(rows)
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size * shape.patches, patch_dim, generator=g).to(torch.bfloat16),
        "image_grid_thw": torch.tensor([[1, shape.grid_h, shape.grid_w]] * batch_size),
    }
    return {key: value.to(device) for key, value in batch.items()}


def matrix_params(module: torch.nn.Module, lora: bool | None = None) -> int:
    """Weights that multiply activations (2-D and up: linear, conv); LoRA only / none / all."""
    return sum(
        p.numel() for n, p in module.named_parameters() if p.dim() >= 2 and (lora is None or (".lora_" in n) == lora)
    )


def window_attention_area(shape: Shape, window_merged: int) -> int:
    """Sum over windows of (patches per window)^2 for one windowed vision layer."""

    def squares(n: int) -> int:
        return (n // window_merged) * window_merged**2 + (n % window_merged) ** 2

    return shape.merge**4 * squares(shape.grid_h // shape.merge) * squares(shape.grid_w // shape.merge)


def step_flops(model, shape: Shape, batch_size: int) -> dict[str, float]:
    """Model (6N-style) and hardware-useful FLOPs of one optimizer step (see the module doc)."""
    base = model.get_base_model()
    text, vision = base.config.text_config, base.config.vision_config
    visual, merger = base.model.visual, base.model.visual.merger
    s, p, t = shape.seq_len, shape.patches, shape.image_tokens

    lm_linear = 2 * s * (matrix_params(base.model.language_model) + base.lm_head.weight.numel())
    lora_linear = 2 * s * matrix_params(base.model.language_model, lora=True)
    lm_attention = 4 * text.num_hidden_layers * s * s * text.hidden_size
    merger_fwd = 2 * t * matrix_params(merger)
    full_layers = len(vision.fullatt_block_indexes)
    window_layers = vision.depth - full_layers
    window_merged = vision.window_size // vision.patch_size // vision.spatial_merge_size
    vision_attention = (
        4 * vision.hidden_size * (full_layers * p * p + window_layers * window_attention_area(shape, window_merged))
    )
    vision_fwd = 2 * p * (matrix_params(visual) - matrix_params(merger)) + vision_attention + merger_fwd

    forward = lm_linear + lm_attention + vision_fwd
    useful = forward + lm_linear + lora_linear + 2 * lm_attention + 2 * merger_fwd
    return {"model": 3.0 * forward * batch_size, "useful": float(useful * batch_size)}


def build_engine(model, batch_size: int, grad_ckpt: bool, lora_dropout: float, vision_no_grad: bool):
    """Phase 1 as the recipe builds it: apply_phase, param_groups, AdamW, DeepSpeed ZeRO-2."""
    import deepspeed

    from defectvlm.config import params_from_dict
    from defectvlm.models.families import get_family
    from defectvlm.train.distributed import init_distributed
    from defectvlm.train.build import deepspeed_config
    from defectvlm.train.phases import apply_phase, check_invariants, param_groups

    params = params_from_dict(
        {
            "train": {
                "batch_size": batch_size,
                "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json"),
                "gradient_checkpointing": grad_ckpt,
                "lora": {"dropout": lora_dropout},
            }
        }
    )
    family, phase = get_family("qwen2_5_vl"), params.train.phase(1)
    _, world = init_distributed()
    model = apply_phase(model, family, phase, params.train.lora)
    if grad_ckpt:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if vision_no_grad:
        model.get_base_model().model.visual.get_input_embeddings()._forward_hooks.clear()
    check_invariants(model, family, 1, phase)
    groups = param_groups(model, family, phase)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in groups],
        weight_decay=params.train.weight_decay,
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(params, world))
    return engine


def timed_steps(engine, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each timed step (synchronised) and the last loss."""
    times: list[float] = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, float(loss.detach())


def run(args: argparse.Namespace) -> dict:
    model = build_model(args.attn)
    if args.vision_attn == "varlen":
        use_varlen_vision_attention(model)
    shape = sample_shape(model.config, IMAGE_WIDTH, IMAGE_HEIGHT, TEXT_TOKENS)
    engine = build_engine(model, args.batch_size, args.grad_ckpt, args.lora_dropout, args.vision_no_grad)
    batch = synthetic_batch(model.config, shape, args.batch_size, engine.device)
    flops = step_flops(engine.module, shape, args.batch_size)
    torch.cuda.reset_peak_memory_stats()
    times, loss = timed_steps(engine, batch, args.warmup, args.steps)
    step = statistics.median(times)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attn": args.attn,
        "grad_ckpt": args.grad_ckpt,
        "lora_dropout": args.lora_dropout,
        "vision_attn": args.vision_attn,
        "vision_no_grad": args.vision_no_grad,
        "batch_size": args.batch_size,
        **asdict(shape),
        "image_tokens": shape.image_tokens,
        "seq_len": shape.seq_len,
        "step_s_median": round(step, 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        "tokens_per_s": round(args.batch_size * shape.seq_len / step, 1),
        "samples_per_s": round(args.batch_size / step, 3),
        "tflops_model": round(flops["model"] / step / 1e12, 1),
        "tflops_useful": round(flops["useful"] / step / 1e12, 1),
        "mfu_model": round(flops["model"] / step / PEAK_FLOPS, 4),
        "mfu_useful": round(flops["useful"] / step / PEAK_FLOPS, 4),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "loss": round(loss, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="the recipe's default is 0.05")
    parser.add_argument(
        "--attn", default="sdpa", help="attn_implementation (sdpa, or flash_attention_2 where installed)"
    )
    parser.add_argument("--vision-attn", choices=("sdpa", "varlen"), default="sdpa", help="see the module doc")
    parser.add_argument("--vision-no-grad", action="store_true", help="see the module doc")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_gpu: no CUDA device here; this benchmark needs one GPU (e.g. an H100)")
    try:
        result = run(args)
    except torch.OutOfMemoryError as exc:
        result = {"batch_size": args.batch_size, "grad_ckpt": args.grad_ckpt, "oom": str(exc).split("\n")[0]}
    text = json.dumps(result)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if "oom" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
