"""Phase-1 training throughput of the recipe itself: `defectvlm train` on generated JPEG files,
a family's published 7B/8B architecture at random bf16 weights, one GPU.

    python benchmarks/bench_train_gpu.py [--family qwen2_5_vl] [--batch-size 2] [--steps 10]
        [--warmup 3] [--grad-ckpt] [--attn auto] [--images 96] [--work /tmp/bench_train_gpu]
        [--arch published|tiny] [--json result.json]

What runs, all through the project's public entry points:
1. `defectvlm demo-data` writes JPEG images (640-1600 x 600-1200 px, EXIF orientations) and
   `ingest`, `split`, `regions`, `build-sft` prepare them at the 1024 px budget
   (`model.max_pixels` = 1344 x 1024; the family's own resize or tiling);
2. a checkpoint folder: the published architecture (`defectvlm.models.tiny_families.published_random`,
   sizes from `defectvlm.models.sizes`) at random bf16 weights with the tiny tokenizer and the
   family's processor, saved with `save_pretrained` and loaded back by the recipe's
   `from_pretrained` like any local checkpoint (`model.name_or_path` = that folder);
3. `defectvlm train --phase 1` under torchrun, twice: `warmup` steps and `warmup + steps` steps.
   Step time = the difference of the two runs' `train_seconds` (metrics.json) over `steps`:
   model loading, DeepSpeed setup, warm-up steps and the end-of-phase evaluation cancel out;
   tokens likewise (metrics.json `tokens.real`). Nothing here reads the loop's internals.
4. The data alone: the recipe's dataset and collator (`train.data`) in a torch DataLoader with
   `--data-workers` processes over the same number of samples, so "data never the bottleneck"
   is data samples/s against training samples/s.

MFU (the issue's 6N count): 6 x (matrix-shaped parameters of the language model, lm_head and
LoRA included) x LM tokens + 6 x (vision tower matrix parameters) x vision patches, attention
not counted, / step time / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM; others:
--peak-tflops). Patches per LM token come from the prepared training set (image tokens x
merge_size^2). `--arch tiny` runs the same chain with the tiny instance (a CPU smoke run; no MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 1344 * 1024


def cli(*args) -> None:
    from defectvlm.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        sys.exit(f"bench_train_gpu: defectvlm {args[0]} failed ({code})")


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def write_params(work: Path, args: argparse.Namespace, checkpoint: Path, max_steps: int, run: str) -> Path:
    """The repo's params.yaml with the benchmark's model, data and phase-1 settings."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw = work / "raw"
    overrides = {
        "data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")},
        "model": {
            "family": args.family,
            "name_or_path": str(checkpoint),
            "attn_implementation": args.attn,
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
        },
        "train": {
            "output_dir": str(work / run),
            "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json"),
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "gradient_checkpointing": args.grad_ckpt,
            "logging_steps": 1,
            "eval_steps": 10**6,
            "save_steps": 10**6,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            "phase1": {"max_steps": max_steps},
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
    }
    path = work / f"params_{run}.yaml"
    path.write_text(yaml.safe_dump(deep_merge(params, overrides), allow_unicode=True), encoding="utf-8")
    return path


def prepare(work: Path, args: argparse.Namespace) -> Path:
    """demo-data JPEGs -> ingest -> split -> regions -> build-sft; returns the SFT folder."""
    sft = work / "04"
    if (sft / "train.jsonl").exists():
        return sft
    half = args.images // 2
    cli("demo-data", "--out", work / "raw", "--n-abnormal", half, "--n-normal", args.images - half, "--seed", 7,
        "--workers", os.cpu_count() or 1)  # fmt: skip
    params = write_params(work, args, Path("unused"), 1, "prepare")
    previous = None
    for step, folder in (("ingest", "01"), ("split", "02"), ("regions", "03"), ("build-sft", "04")):
        extra = ["--quiet"] if step == "ingest" else ["--in", work / previous]
        cli(step, "--params", params, "--out", work / folder, *extra)
        previous = folder
    return sft


def write_checkpoint(work: Path, args: argparse.Namespace) -> Path:
    """The family's architecture at random weights (bf16 on the GPU) + its processor, on disk."""
    import transformers

    from defectvlm.models.families import get_family
    from defectvlm.models.tiny_families import build_tiny_family, published_random

    folder = work / f"checkpoint_{args.family}_{args.arch}"
    if (folder / "config.json").exists():
        return folder
    if args.arch == "tiny":
        model, processor = build_tiny_family(args.family, MIN_PIXELS, MAX_PIXELS)
    else:
        config, processor = published_random(args.family, MIN_PIXELS, MAX_PIXELS)
        model_class = getattr(transformers, get_family(args.family).model_class)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = model_class._from_config(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def train(work: Path, args: argparse.Namespace, checkpoint: Path, sft: Path, steps: int, run: str) -> dict:
    params = write_params(work, args, checkpoint, steps, run)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1"]
    command = [*torchrun, "-m", "defectvlm", "train", "--phase", "1", "--params", params, "--in", sft, "--no-tracking"]
    started = time.perf_counter()
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_train_gpu: training run {run} failed:\n{done.stderr[-4000:]}")
    metrics = json.loads((work / run / "phase1" / "metrics.json").read_text(encoding="utf-8"))
    return {**metrics, "process_seconds": time.perf_counter() - started}


def data_only(sft: Path, checkpoint: Path, family: str, samples: int, batch_size: int, workers: int) -> dict:
    """The recipe's dataset + collator in a DataLoader: samples/s, LM tokens and vision patches."""
    import transformers

    from defectvlm.io import read_jsonl
    from defectvlm.models.families import get_family
    from defectvlm.train.data import Collator, SftDataset

    kwargs = get_family(family).processor_kwargs(MIN_PIXELS, MAX_PIXELS)
    processor = transformers.AutoProcessor.from_pretrained(str(checkpoint), **kwargs)
    dataset = SftDataset(read_jsonl(sft / "train.jsonl"), processor)
    indices = [i % len(dataset) for i in range(samples)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=Collator(processor),
    )
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    merge = get_family(family).merge_size
    tokens = patches = 0
    started = time.perf_counter()
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
        patches += int((batch["input_ids"] == image_token).sum()) * merge**2
    seconds = time.perf_counter() - started
    return {"samples_per_s": round(samples / seconds, 2), "patches_per_token": patches / tokens, "samples": samples}


def matrix_params(family_name: str, checkpoint: Path) -> dict[str, int]:
    """Matrix-shaped parameters (phase 1's LoRA included) of the LM (+ lm_head) and the vision tower."""
    import transformers

    from defectvlm.config import params_from_dict
    from defectvlm.models.families import get_family
    from defectvlm.train.phases import apply_phase

    family = get_family(family_name)
    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    with torch.device("meta"):
        base = getattr(transformers, family.model_class)(config)
    train = params_from_dict({}).train
    model = apply_phase(base, family, train.phase(1), train.lora).get_base_model()
    vision = family.vision_tower + "."
    counts = {"lm": 0, "vision": 0}
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            counts["vision" if name.startswith(vision) else "lm"] += parameter.numel()
    return counts


def run(args: argparse.Namespace) -> dict:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sft = prepare(work, args)
    checkpoint = write_checkpoint(work, args)
    short = train(work, args, checkpoint, sft, args.warmup, "warmup")
    long = train(work, args, checkpoint, sft, args.warmup + args.steps, "timed")
    steps = long["steps"] - short["steps"]
    seconds = long["train_seconds"] - short["train_seconds"]
    tokens = long["tokens"]["real"] - short["tokens"]["real"]
    samples = steps * args.batch_size
    data = data_only(sft, checkpoint, args.family, samples, args.batch_size, args.data_workers)
    params = matrix_params(args.family, checkpoint)
    flops = 6 * (params["lm"] * tokens + params["vision"] * tokens * data["patches_per_token"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = (
        args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    )
    step = seconds / steps
    return {
        "device": device,
        "family": args.family,
        "arch": args.arch,
        "attn": args.attn,
        "grad_ckpt": args.grad_ckpt,
        "batch_size": args.batch_size,
        "timed_steps": steps,
        "step_s": round(step, 4),
        "samples_per_s": round(samples / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_sample": round(tokens / samples, 1),
        "padding_fraction": round(1 - long["tokens"]["real"] / long["tokens"]["padded"], 4),
        "data_samples_per_s": data["samples_per_s"],
        "data_headroom": round(data["samples_per_s"] / (samples / seconds), 2),
        "params_lm_matrix": params["lm"],
        "params_vision_matrix": params["vision"],
        "tflops_6n": round(flops / seconds / 1e12, 1),
        "mfu_6n": round(flops / seconds / peak, 4) if peak else None,
        "warmup_run_s": round(short["process_seconds"], 1),
        "timed_run_s": round(long["process_seconds"], 1),
        "final_loss": long["history"][-1].get("eval_loss") if long.get("history") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"))
    parser.add_argument("--arch", default="published", choices=("published", "tiny"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (beyond the warm-up run's)")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the warm-up run")
    parser.add_argument("--grad-ckpt", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--attn", default="auto", help="model.attn_implementation")
    parser.add_argument("--images", type=int, default=96, help="demo images to generate (half abnormal)")
    parser.add_argument("--data-workers", type=int, default=4, help="DataLoader processes of the data-only pass")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU other than H100/H200")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_gpu"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.arch == "published" and not torch.cuda.is_available():
        sys.exit("bench_train_gpu: no CUDA device here; the published architecture needs one GPU (--arch tiny on CPU)")
    result = run(args)
    text = json.dumps(result)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
