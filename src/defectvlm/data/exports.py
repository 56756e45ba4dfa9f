"""The SFT splits in the files ms-swift and LLaMA-Factory train from.

Each tool resizes images its own way (swift feeds near-full resolution; LLaMA-Factory first
shrinks to `image_max_pixels`, truncating to whole pixels; both ignore EXIF rotation). So the
export writes the images the model must see: upright, already resized to the family's
processor frame (the `smart_resize` the `<regions>` boxes were computed for), lossless PNG
without metadata, named by their content. Sides are multiples of the patch factor and the
area lies within the pixel budget, so any further Qwen-VL resize leaves them unchanged.
Image paths are relative to the export folder, which is self-contained.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import blake3
import yaml
from PIL import Image

from defectvlm.config import SPLITS, ModelParams
from defectvlm.data.images import load_upright, png_bytes
from defectvlm.data.sft import SftResult
from defectvlm.data.yolo_export import export_yolo
from defectvlm.errors import StepFailure
from defectvlm.io import write_bytes_atomic, write_json_atomic, write_splits
from defectvlm.models.families import Family, get_family

IMAGE_TOKEN = "<image>"  # where ms-swift and LLaMA-Factory put the image in a text turn
IMAGES_DIR = "images"
LLAMAFACTORY_YAML = "train_lora.yaml"
# Each tool's chat template for a family (LLaMA-Factory serves Qwen2.5-VL with its qwen2_vl template).
TEMPLATES = {
    "swift": {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "internvl": "internvl3"},
    "llamafactory": {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "internvl": "intern_vl"},
}
# The checkpoint named in the printed commands when model.name_or_path is the offline 'tiny' model.
REFERENCE_CHECKPOINTS = {
    "qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct",
    "internvl": "OpenGVLab/InternVL3-8B-hf",
}


def plain_messages(sample: dict) -> list[dict]:
    """Messages with the image as an `<image>` token in the user text (swift / LLaMA-Factory)."""
    system, user, assistant = sample["messages"]
    text = "".join(part["text"] for part in user["content"] if part["type"] == "text")
    return [
        {"role": "system", "content": system["content"]},
        {"role": "user", "content": f"{IMAGE_TOKEN}{text}"},
        {"role": "assistant", "content": assistant["content"]},
    ]


def export_sample(sample: dict, fmt: str, image: str) -> dict:
    """One sample in `fmt`, its image given as the exported file."""
    messages = plain_messages(sample)
    if fmt == "swift":
        return {"messages": messages, "images": [image]}
    if fmt == "llamafactory":
        return {"messages": messages[1:], "system": messages[0]["content"], "images": [image]}
    raise ValueError(f"unknown export format {fmt!r}")


def llamafactory_dataset_info(prefix: str = "defectvlm") -> dict:
    """The `dataset_info.json` entries LLaMA-Factory needs for the three split files."""
    return {
        f"{prefix}_{split}": {
            "file_name": f"{split}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "system": "system", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
        for split in SPLITS
    }


def model_input_image(path: str, size: tuple[int, int], family: Family, model: ModelParams) -> Image.Image:
    """The image as the family's processor feeds it: upright, resized to its frame (see module doc)."""
    image = load_upright(path)
    if image.size != tuple(size):
        raise StepFailure(
            f"{path}: upright size {image.size[0]}x{image.size[1]} differs from the {size[0]}x{size[1]} "
            "recorded at ingest; the file changed: re-run ingest"
        )
    width, height = family.resized(*image.size, model.min_pixels, model.max_pixels)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def write_export(fmt: str, result: SftResult, regions: dict[str, list[dict]], model: ModelParams, folder: Path) -> dict:
    """Write the `fmt` export of the SFT result into `folder`; returns its summary."""
    if fmt == "yolo":
        return export_yolo(regions, result.summary["classes"], folder)
    return export_vlm(result.splits, regions, fmt, model, folder)


def export_vlm(
    splits: dict[str, list[dict]], regions: dict[str, list[dict]], fmt: str, model: ModelParams, folder: Path
) -> dict:
    """Write `folder`/{train,val,test}.jsonl, images/ (and LLaMA-Factory's dataset_info.json and
    a ready training YAML); returns the export summary with the matching command line."""
    family = get_family(model.family)
    sizes = {img["id"]: (img["width"], img["height"]) for rows in regions.values() for img in rows}
    exported: dict[str, str] = {}  # source image path -> path relative to folder
    for samples in splits.values():
        for sample in samples:
            source = sample["images"][0]
            if source in exported:
                continue
            image = model_input_image(source, sizes[sample["image_id"]], family, model)
            if family.coords == "resized_pixels" and list(image.size) != sample["meta"]["frame"]:
                raise StepFailure(
                    f"{source}: its regions were written for a {sample['meta']['frame']} frame, model.* now gives "
                    f"{list(image.size)}: re-run the regions step with the same model settings"
                )
            data = png_bytes(image)
            exported[source] = f"{IMAGES_DIR}/{blake3.blake3(data).hexdigest()[:32]}.png"
            write_bytes_atomic(folder / exported[source], data)
    _remove_other_files(folder / IMAGES_DIR, {Path(p).name for p in exported.values()})
    write_splits(
        folder, {name: (export_sample(s, fmt, exported[s["images"][0]]) for s in rows) for name, rows in splits.items()}
    )
    summary = _summary(fmt, family, model, folder, len(exported))
    if fmt == "llamafactory":
        write_json_atomic(folder / "dataset_info.json", llamafactory_dataset_info())
        write_bytes_atomic(folder / LLAMAFACTORY_YAML, llamafactory_yaml(summary).encode("utf-8"))
    write_json_atomic(folder / "export_summary.json", summary)
    return summary


def _remove_other_files(folder: Path, keep: Iterable[str]) -> None:
    """Content-addressed files of an earlier run that this run did not write."""
    keep = set(keep)
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name not in keep:
            path.unlink()


def _summary(fmt: str, family: Family, model: ModelParams, folder: Path, n_images: int) -> dict:
    checkpoint = REFERENCE_CHECKPOINTS[family.name] if model.name_or_path == "tiny" else model.name_or_path
    template = TEMPLATES[fmt][family.name]
    frame_rule = (
        f"images written upright and resized to smart_resize(height, width, factor={family.image_factor}, "
        f"min_pixels={model.min_pixels}, max_pixels={model.max_pixels}); "
        + (
            "<regions> boxes are absolute pixels of that written image"
            if family.coords == "resized_pixels"
            else "<regions> boxes are integers 0..1000 of the image"
        )
    )
    if fmt == "swift":
        pixels = {"MIN_PIXELS": model.min_pixels, "MAX_PIXELS": model.max_pixels}
        command = (
            f"cd {folder} && MIN_PIXELS={model.min_pixels} MAX_PIXELS={model.max_pixels} swift sft "
            f"--model {checkpoint} --template {template} --train_type lora "
            "--dataset train.jsonl --val_dataset val.jsonl --output_dir output"
        )
    else:
        pixels = {"image_min_pixels": model.min_pixels, "image_max_pixels": model.max_pixels}
        command = f"cd {folder} && llamafactory-cli train {LLAMAFACTORY_YAML}"
    return {
        "format": fmt,
        "folder": str(folder),
        "image_root": f"{folder} (image paths in the split files are relative to it)",
        "images": n_images,
        "family": family.name,
        "coords": family.coords,
        "frame_rule": frame_rule,
        "template": template,
        "checkpoint": checkpoint,
        "pixels": pixels,
        "command": command,
    }


def llamafactory_yaml(summary: dict) -> str:
    """A LLaMA-Factory training config for the export (run from the export folder)."""
    config = {
        "model_name_or_path": summary["checkpoint"],
        "trust_remote_code": True,
        **summary["pixels"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset_dir": ".",
        "media_dir": ".",
        "dataset": "defectvlm_train",
        "eval_dataset": "defectvlm_val",
        "template": summary["template"],
        "output_dir": "output",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 3.0,
        "bf16": True,
    }
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
