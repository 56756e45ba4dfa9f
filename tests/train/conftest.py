"""Params that train the tiny model for a few steps (the SFT data: tests/conftest.py's sft_dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectvlm.config import load_params
from tests.conftest import REPO, write_params


def train_overrides(tmp_path: Path, **train) -> dict:
    return {
        "train": {
            "output_dir": str(tmp_path / "runs"),
            "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json"),
            "batch_size": 2,
            "logging_steps": 1,
            "eval_steps": 100,
            "save_steps": 100,
            "phase1": {"max_steps": 3},
            "phase2": {"max_steps": 2},
            "phase3": {"max_steps": 2},
            **train,
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
    }


@pytest.fixture
def train_params(tmp_path):
    def make(**train):
        path = write_params(tmp_path / "params.yaml", train_overrides(tmp_path, **train))
        return path, load_params(path)

    return make
