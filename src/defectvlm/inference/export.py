"""`defectvlm export`: a merged Hugging Face checkpoint that plain transformers (and vLLM)
load with no PEFT and no defectvlm code, plus `defectvlm.json` (base, registry version,
family, frame rule, pixel budget, prompt, classes, threshold, parity).

Before writing, every tensor of the adapter file must have a place in the merged model (a
LoRA layer that merges, or a module PEFT restores whole); after writing, the export loaded
by the family's transformers class must score a fixed golden set like base + adapter."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from defectvlm.errors import StepFailure
from defectvlm.inference.loading import EXPORT_FILE, LoadedModel, load_export, load_model
from defectvlm.io import write_json_atomic
from defectvlm.models.families import get_family
from defectvlm.tracking.registry import PARITY_TAG
from defectvlm.train.artifacts import ADAPTER_FILE, ADAPTER_NAME
from defectvlm.train.phases import PEFT_PREFIX, canonical

PARITY_TOLERANCE = 1e-4
GOLDEN_IMAGES = 4


def unplaced_tensors(saved: dict[str, torch.Tensor], model) -> list[str]:
    """Names of adapter tensors the PEFT model did not take up (they would vanish in the merge)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    wrapped = {name for name, module in base.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    lost = []
    for key in sorted(saved):
        name = key.removeprefix(PEFT_PREFIX)
        lora = re.match(r"(.+)\.lora_[AB]\.weight$", name)
        if lora:
            try:
                layer = base.get_submodule(lora[1])
            except AttributeError:
                layer = None
            if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
                lost.append(key)
        elif not any(name.startswith(module + ".") for module in wrapped):
            lost.append(key)
    return lost


def golden_images(folder: Path, size: tuple[int, int] = (224, 160)) -> list[Path]:
    """A fixed set of images (seeded noise and stripes), the same on every machine."""
    paths = []
    for k in range(GOLDEN_IMAGES):
        rng = np.random.default_rng(k)
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        pixels[:, (k * 37) % size[0] :: 16] = 255 - 40 * k
        path = folder / f"golden_{k}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def parity(reference: LoadedModel, exported: LoadedModel, threshold: float) -> dict:
    """Max |dP(abnormal)| over every region of the golden set, reference vs export."""
    from defectvlm.inference.predict import predict_images

    with tempfile.TemporaryDirectory() as tmp:
        images = golden_images(Path(tmp))
        a = predict_images(reference, images, None, threshold, progress=False)
        b = predict_images(exported, images, None, threshold, progress=False)
    pa = [g["p_abnormal"] for r in a for g in r["regions"]]
    pb = [g["p_abnormal"] for r in b for g in r["regions"]]
    worst = max((abs(x - y) for x, y in zip(pa, pb, strict=True)), default=0.0)
    return {
        "max_abs_diff": worst,
        "tolerance": PARITY_TOLERANCE,
        "passed": worst <= PARITY_TOLERANCE,
        "regions": len(pa),
        "images": GOLDEN_IMAGES,
        "dtype": "float32",
    }


def export(uri: str, out: Path, tracking_uri: str | None = None) -> dict:
    """Write the merged checkpoint and defectvlm.json; returns the parity record."""
    reference = load_model(uri, device="cpu", tracking_uri=tracking_uri)
    config = reference.config
    if config.kind != "adapter":
        raise StepFailure(f"{uri} is already an export")
    folder = Path(config.folder)
    saved = load_file(str(folder / ADAPTER_FILE))
    lost = unplaced_tensors(saved, reference.model)
    if lost:
        raise StepFailure(
            f"{folder}/{ADAPTER_FILE}: {len(lost)} trained tensors would be dropped by the merge "
            f"(no LoRA layer or modules_to_save entry takes them), e.g. {', '.join(lost[:3])}"
        )
    merged = _merged(reference, folder, saved)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    reference.processor.save_pretrained(str(out))
    family = get_family(config.family)
    meta = {
        "base": config.base,
        "registry": config.registry and {k: config.registry[k] for k in ("name", "version")},
        "source": uri,
        "family": config.family,
        "frame": {"coords": family.coords, "rule": _frame_rule(family.coords)},
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "classes": config.classes,
        "threshold": config.threshold,
        "prompt": config.prompt,
    }
    write_json_atomic(out / EXPORT_FILE, meta)
    model, processor = load_export(out, config, dtype=torch.float32)
    exported = LoadedModel(model.eval(), processor, config)
    result = parity(reference, exported, config.threshold if config.threshold is not None else 0.5)
    write_json_atomic(out / EXPORT_FILE, {**meta, "parity": result})
    if config.registry:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=config.registry["tracking_uri"])
        client.set_model_version_tag(
            config.registry["name"], config.registry["version"], PARITY_TAG, json.dumps(result)
        )
    return result


def _merged(reference: LoadedModel, folder: Path, saved: dict[str, torch.Tensor]):
    """base + adapter merged in a fresh copy (the reference stays unmerged for the parity check);
    the modules saved whole must come out of the merge bit for bit."""
    from defectvlm.inference.loading import load_adapter

    model, _ = load_adapter(folder, reference.config)
    merged = model.merge_and_unload()
    state = merged.state_dict()
    for key, tensor in saved.items():
        if ".lora_" in key:
            continue
        name = canonical(key)
        if name not in state or not torch.equal(state[name].cpu(), tensor.to(state[name].dtype)):
            raise StepFailure(f"{folder}: {name} is not in the merged model as trained")
    return merged


def _frame_rule(coords: str) -> str:
    if coords == "resized_pixels":
        return "boxes in pixels of the image after the processor's smart_resize (min_pixels..max_pixels)"
    return "boxes as integers 0..1000 of the image width and height"
