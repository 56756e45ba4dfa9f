"""`dvc repro` of the pipeline in a temporary git repository, as a user's clone would run it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defectvlm.data.demo import generate_demo
from tests.conftest import REPO, read_json, write_params

FAST_TRAIN = {
    "batch_size": 2,
    "eval_steps": 2,
    "save_steps": 100,
    "phase1": {"max_steps": 2},
    "phase2": {"max_steps": 2},
    "phase3": {"max_steps": 2},
}

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_dvc_repro_runs_every_stage_then_skips_then_reruns_only_what_a_param_change_touches(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    write_params(
        repo / "params.yaml", {"train": FAST_TRAIN, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    )
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", repo / "configs")
    generate_demo(repo / "data" / "raw", n_abnormal=12, n_normal=8)
    assert _run(["git", "init", "-q"], repo).returncode == 0

    first = _run(["dvc", "repro"], repo)
    assert first.returncode == 0, first.stdout + first.stderr
    report = read_json(repo / "data" / "01_ingested" / "ingest_report.json")
    assert report["images"]["in_manifest"] == 20 and report["images"]["rejected"] == 0
    for split in ("train", "val", "test"):
        assert (repo / "data" / "04_sft" / f"{split}.jsonl").stat().st_size > 0
    assert (repo / "dvc.lock").exists()

    again = _run(["dvc", "repro"], repo)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    for phase in (1, 2, 3):
        assert (repo / "runs" / f"phase{phase}" / "best" / "adapter_model.safetensors").exists()
    shown = _run(["dvc", "metrics", "show"], repo)
    assert shown.returncode == 0 and "test.roi.f1" in shown.stdout and "baseline.image.auroc" in shown.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["phase3"]["lr_vision"] = 2.0e-5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    changed = _run(["dvc", "repro"], repo)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    ran = [line.split("'")[1] for line in changed.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["train_phase3", "evaluate"]  # only the changed phase and what reads it
