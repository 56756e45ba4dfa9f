"""A detector trained for a few steps on tiny letterboxed images of the test session's split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_params

TINY = {"input_size": 128, "crop_size": 64, "width": 8, "steps": 24, "batch_size": 4, "threads": 1, "confidence": 0.001}


def detector_params(path: Path, out: Path, sections: dict | None = None, **overrides) -> Path:
    return write_params(path, {"detector": {**TINY, "output_dir": str(out), **overrides}, **(sections or {})})


@pytest.fixture(scope="session")
def split_dir(sft_dir, tmp_path_factory) -> Path:
    """train/val of the session's split, without test.jsonl: training must not need it."""
    folder = tmp_path_factory.mktemp("split")
    for name in ("train", "val"):
        shutil.copy(sft_dir.parent / "02" / f"{name}.jsonl", folder / f"{name}.jsonl")
    return folder


@pytest.fixture(scope="session")
def detector_dir(split_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detector")
    params = detector_params(root / "params.yaml", root / "run")
    assert run_cli("train-detector", "--params", params, "--in", split_dir, "--no-tracking") == 0
    return root / "run"
