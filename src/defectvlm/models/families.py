"""Per-family facts: where a model's parts live, which frame its boxes are written in, how
its processor takes the pixel budget and how its chat template marks the assistant's turn.

Qwen2-VL, Qwen3-VL and InternVL read boxes as integers normalised to 0..1000 of the image;
Qwen2.5-VL reads absolute pixels of the image *after* its processor resized it (sides
rounded to multiples of patch_size * merge_size, area between min_pixels and max_pixels,
computed by transformers' own `smart_resize`). InternVL's processor cuts the image into
`tile_size` tiles (plus a thumbnail) instead of resizing it to a pixel budget, so the budget
becomes a number of tiles. Nothing outside this table knows which family it is talking to:
the data path asks the processor it is given (`family_of`). Adding a family is adding one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

NORMALISED_RANGE = 1000


@dataclass(frozen=True)
class Family:
    name: str
    coords: Literal["resized_pixels", "normalised_1000"]
    patch_size: int
    merge_size: int
    model_class: str  # the transformers class
    processor_class: str  # the transformers processor class (how `family_of` recognises it)
    vision_tower: str  # module paths inside that class
    vision_blocks: str
    projector: str  # the module mapping vision features into the language model
    language_layers: str
    lm_lora_leaves: str  # regex of the LoRA targets inside one language layer
    vision_lora_leaves: str  # regex of the LoRA targets inside one vision block
    extra_projectors: tuple[str, ...] = ()  # further such modules (trained with the projector)
    tile_size: int | None = None  # the processor tiles the image (InternVL) instead of resizing it
    assistant_header: str = "<|im_start|>assistant\n"  # what the chat template opens the answer with
    turn_end: str = "<|im_end|>"  # the token that closes a turn (trained as part of the answer)
    vision_packed: bool = True  # the vision tower packs images/windows into one sequence (cu_seqlens)

    @property
    def projectors(self) -> tuple[str, ...]:
        return (self.projector, *self.extra_projectors)

    @property
    def image_factor(self) -> int:
        return self.patch_size * self.merge_size

    def processor_kwargs(self, min_pixels: int, max_pixels: int) -> dict:
        """The pixel budget in the words of this family's image processor."""
        if self.tile_size is None:
            return {"min_pixels": min_pixels, "max_pixels": max_pixels}
        return {"crop_to_patches": True, "min_patches": 1, "max_patches": max(1, max_pixels // self.tile_size**2)}

    def resized(self, width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """Width, height of the image as the processor feeds it to the model."""
        h, w = smart_resize(height, width, factor=self.image_factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return w, h

    def frame(self, width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """The width, height that box coordinates are expressed in for this family."""
        if self.coords == "resized_pixels":
            return self.resized(width, height, min_pixels, max_pixels)
        return NORMALISED_RANGE, NORMALISED_RANGE

    def to_native(self, xyxy: list[float], width: int, height: int, frame: tuple[int, int]) -> list[int]:
        """A box in pixels of the displayed image -> integers in `frame` (from `self.frame`)."""
        fw, fh = frame
        sx, sy = fw / width, fh / height
        x1, y1, x2, y2 = xyxy
        native = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
        return [min(max(v, 0), limit) for v, limit in zip(native, (fw, fh, fw, fh), strict=True)]

    def from_native(self, box: list[int], width: int, height: int, frame: tuple[int, int]) -> list[float]:
        """The inverse of `to_native` (up to its rounding)."""
        fw, fh = frame
        sx, sy = width / fw, height / fh
        return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


_LM_LEAVES = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)"
_QWEN_PARTS = {
    "vision_tower": "model.visual",
    "vision_blocks": "model.visual.blocks",
    "projector": "model.visual.merger",
    "language_layers": "model.language_model.layers",
    "lm_lora_leaves": _LM_LEAVES,
}

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        name="qwen2_vl",
        coords="normalised_1000",
        patch_size=14,
        merge_size=2,
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        vision_lora_leaves=r"attn\.(qkv|proj)|mlp\.(fc1|fc2)",
        **_QWEN_PARTS,
    ),
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        coords="resized_pixels",
        patch_size=14,
        merge_size=2,
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        vision_lora_leaves=r"attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj)",
        **_QWEN_PARTS,
    ),
    "qwen3_vl": Family(
        name="qwen3_vl",
        coords="normalised_1000",
        patch_size=16,
        merge_size=2,
        model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        vision_lora_leaves=r"attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2)",
        # the deepstack mergers feed intermediate vision features into the first LM layers
        extra_projectors=("model.visual.deepstack_merger_list",),
        **_QWEN_PARTS,
    ),
    "internvl": Family(
        name="internvl",
        coords="normalised_1000",
        patch_size=14,
        merge_size=2,
        model_class="InternVLForConditionalGeneration",
        processor_class="InternVLProcessor",
        vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.encoder.layer",
        projector="model.multi_modal_projector",
        language_layers="model.language_model.layers",
        lm_lora_leaves=_LM_LEAVES,
        vision_lora_leaves=r"attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2)",
        tile_size=448,
        vision_packed=False,  # fixed 448 px tiles, one batch row each
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def family_of(processor) -> Family:
    """The family whose processor class `processor` is (the data path's only way to know)."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if family.processor_class == name:
            return family
    raise ValueError(f"{name} is not the processor of a known model family (known: {', '.join(FAMILIES)})")
