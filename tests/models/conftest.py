"""Per-family SFT data (the session's split, regions and SFT redone in each family's frame) and
the family's tiny-random model."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from defectvlm.config import ModelParams
from defectvlm.io import read_jsonl
from defectvlm.models.loading import load_base
from defectvlm.models.tiny_families import build_tiny_family
from tests.conftest import run_cli, write_params

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224  # small images: fast steps


@functools.cache
def tiny(family: str):
    """The family's tiny-random model and processor at the tests' pixel budget (built once)."""
    if family == "qwen2_5_vl":  # `tiny-random` for qwen2_5_vl is defectvlm.models.tiny's model
        return build_tiny_family(family, MIN_PIXELS, MAX_PIXELS)
    return load_base(
        ModelParams(family=family, name_or_path="tiny-random", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    )


@pytest.fixture(scope="session")
def family_sft(sft_dir, tmp_path_factory):
    """family -> (sft folder, its train samples): regions and build-sft run with model.family set."""
    made: dict[str, tuple[Path, list[dict]]] = {}

    def make(family: str) -> tuple[Path, list[dict]]:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            model = {"family": family, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
            params = write_params(root / "params.yaml", {"model": model})
            split = sft_dir.parent / "02"
            assert run_cli("regions", "--params", params, "--in", split, "--out", root / "03") == 0
            assert run_cli("build-sft", "--params", params, "--in", root / "03", "--out", root / "04") == 0
            made[family] = (root / "04", read_jsonl(root / "04" / "train.jsonl"))
        return made[family]

    return make
