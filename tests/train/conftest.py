"""A small SFT dataset prepared once (demo -> ingest -> split -> regions -> build-sft) and
params that train the tiny model for a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from defectvlm.config import load_params
from tests.conftest import REPO, run_cli, write_params


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    raw = root / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 16, "--n-normal", 16, "--seed", 5) == 0
    params = write_params(
        root / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    steps = [("ingest", "01"), ("split", "02"), ("regions", "03"), ("build-sft", "04")]
    previous = None
    for step, folder in steps:
        args = [step, "--params", params, "--out", root / folder]
        args += ["--quiet"] if step == "ingest" else ["--in", root / previous]
        assert run_cli(*args) == 0
        previous = folder
    return root / "04"


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


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)
