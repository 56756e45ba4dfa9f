"""A trained and evaluated workspace (phase 1 only, a few steps) shared by the registry tests:
the registry logic needs a real adapter and a real evaluation, not a good one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_params
from tests.train.conftest import train_overrides


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, sft_dir) -> Path:
    root = tmp_path_factory.mktemp("evaluated")
    overrides = train_overrides(root, phase1={"max_steps": 2}, phase2={"enabled": False, "vision_lora_top_n": 2})
    overrides["train"]["phase3"] = {"enabled": False, "vision_lora_top_n": 2, "unfreeze_top_k": 1}
    params = write_params(root / "params.yaml", overrides)
    assert run_cli("train", "--params", params, "--phase", 1, "--in", sft_dir, "--no-tracking") == 0
    assert (
        run_cli(
            "evaluate", "--params", params, "--in", sft_dir, "--out", root / "reports", "--no-baseline", "--no-tracking"
        )
        == 0
    )
    shutil.copytree(sft_dir, root / "sft")
    return root


@pytest.fixture
def workspace(evaluated, tmp_path, monkeypatch) -> Path:
    """A git repository holding the evaluated run, with its own MLflow store; the current directory."""
    work = tmp_path / "work"
    shutil.copytree(evaluated, work, ignore=shutil.ignore_patterns("mlflow.db"))
    for moved in ("params.yaml", "reports/metrics.json", "reports/inference.json"):  # paths into the copy
        text = (work / moved).read_text(encoding="utf-8").replace(str(evaluated), str(work))
        (work / moved).write_text(text, encoding="utf-8")
    for args in (
        ["init", "-q"],
        ["add", "params.yaml"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
    ):
        subprocess.run(["git", *args], cwd=work, check=True)
    monkeypatch.chdir(work)
    return work
