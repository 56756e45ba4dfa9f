"""`dvc repro` of the pipeline in a temporary git repository, as a user's clone would run it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from defectvlm.data.demo import generate_demo
from tests.conftest import REPO, read_json

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_dvc_repro_runs_every_stage_then_skips_then_reruns_what_a_param_change_touches(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
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

    params = (repo / "params.yaml").read_text(encoding="utf-8").replace("noise_ratio: 0.05", "noise_ratio: 0.2")
    (repo / "params.yaml").write_text(params, encoding="utf-8")
    changed = _run(["dvc", "repro"], repo)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'sft'" in changed.stdout and "Running stage 'ingest'" not in changed.stdout
