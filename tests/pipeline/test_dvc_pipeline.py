"""The whole pipeline as a user's clone runs it: `dvc repro` in a temporary git repository,
then the registry (candidate -> champion) and `reproduce` from the recorded data version."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from defectvlm.data.demo import generate_demo
from defectvlm.io import read_jsonl
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
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _ok(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = _run(args, cwd)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


def _ran(done: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


@pytest.fixture
def repo(tmp_path) -> Path:
    """A clone-like git repository with the small demo dataset added to DVC, everything committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    write_params(
        repo / "params.yaml",
        {
            "train": FAST_TRAIN,
            "detector": {"steps": 2, "input_size": 64, "crop_size": 32, "width": 4, "threads": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "registry": {"gates": {"roi.f1": 0.0, "image.auroc": 0.0}},
            "sft": {"regions_per_prompt": 1},  # the demo's setting, end to end
        },
    )
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", repo / "configs")
    generate_demo(repo / "data" / "raw", n_abnormal=12, n_normal=8)
    _ok(["git", "init", "-q"], repo)
    _ok(["dvc", "add", "-q", "data/raw/abnormal_root", "data/raw/normal_root"], repo)
    _ok(["git", "add", "-A"], repo)
    _ok(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline at a data version"], repo)
    return repo


def test_repro_registers_then_skips_promotes_reproduces_and_reruns_only_what_a_param_change_touches(repo, tmp_path):
    first = _ok(["dvc", "repro"], repo)
    ran = _ran(first)
    assert ran.index("train_phase3") < ran.index("evaluate") < ran.index("register") and "train_detector" in ran
    report = read_json(repo / "data" / "01_ingested" / "ingest_report.json")
    assert report["images"]["in_manifest"] == 20 and report["images"]["rejected"] == 0
    for phase in (1, 2, 3):
        assert (repo / "runs" / f"phase{phase}" / "best" / "adapter_model.safetensors").exists()
    shown = _ok(["dvc", "metrics", "show"], repo)
    assert "test.roi.f1" in shown.stdout and "baseline.image.auroc" in shown.stdout
    # the cascade report is a stage of its own (make demo is dvc repro and nothing else)
    assert ran.index("train_detector") < ran.index("evaluate_cascade") and ran.index("train_phase3") < ran.index(
        "evaluate_cascade"
    )
    cascade = read_json(repo / "reports" / "cascade" / "cascade_metrics.json")
    assert cascade["split"] == "test" and "gain" in cascade and "agree.precision" in shown.stdout
    # what the run produced is ignored by git but DVC's own lock (untracked: DVC refuses an ignored one),
    # so the registration below records git.dirty false
    assert _ok(["git", "status", "--porcelain"], repo).stdout == "?? dvc.lock\n"

    again = _ok(["dvc", "repro"], repo)
    assert _ran(again) == [], again.stdout

    # the registered candidate leads back to the commit and to the digests DVC recorded
    registration = read_json(repo / "reports" / "registration.json")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    candidate = client.get_model_version_by_alias("defectvlm-adapter", "candidate")
    assert candidate.version == registration["version"]

    # then predict and export ran on that version: the test images, and a merged checkpoint whose
    # parity check is tagged on it
    assert ran.index("register") < ran.index("predict") and ran.index("register") < ran.index("export")
    predicted = read_jsonl(repo / "reports" / "predict" / "predictions.jsonl")
    test_images = {Path(record["path"]).name for record in read_jsonl(repo / "data" / "02_split" / "test.jsonl")}
    assert {Path(record["image"]).name for record in predicted} == test_images
    assert {str(record["model"]["version"]) for record in predicted} == {str(registration["version"])}
    exported = read_json(repo / "exports" / "candidate" / "defectvlm.json")
    assert exported["registry"] == {"name": "defectvlm-adapter", "version": str(registration["version"])}  # MLflow: str
    assert json.loads(candidate.tags["export.parity"])["passed"] is True
    head = _ok(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert candidate.tags["git.commit"] == head and candidate.tags["git.dirty"] == "false"
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    sft_outs = {o["path"]: o["md5"] for o in lock["stages"]["sft"]["outs"]}
    assert candidate.tags["data.sft.test.md5"] == sft_outs["data/04_sft/test.jsonl"]
    raw_md5 = yaml.safe_load((repo / "data" / "raw" / "abnormal_root.dvc").read_text())["outs"][0]["md5"]
    assert candidate.tags["dvc.data/raw/abnormal_root"] == raw_md5

    promoted = _run(["defectvlm", "promote", "--alias", "champion"], repo)
    assert promoted.returncode == 0, promoted.stderr
    assert client.get_model_version_by_alias("defectvlm-adapter", "champion").version == candidate.version

    out = tmp_path / "reproduce.json"
    reproduced = _run(["defectvlm", "reproduce", "--run-id", registration["run_id"], "--out", str(out)], repo)
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    comparison = read_json(out)
    assert comparison["ok"] and comparison["commit"] == head
    assert {"test.roi.f1", "test.image.auroc", "threshold"} <= set(comparison["metrics"])

    # a tampered image in the DVC cache: the restored data no longer match the recorded version
    listing = json.loads(
        (repo / ".dvc" / "cache" / "files" / "md5" / raw_md5[:2] / raw_md5[2:]).read_text(encoding="utf-8")
    )
    image_md5 = next(entry["md5"] for entry in listing if entry["relpath"].endswith(".jpg"))
    cached = repo / ".dvc" / "cache" / "files" / "md5" / image_md5[:2] / image_md5[2:]
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-100] + b"\0" * 100)
    tampered = _run(["defectvlm", "reproduce", "--run-id", registration["run_id"]], repo)
    assert tampered.returncode == 1
    assert "restored raw data differ from the recorded version" in tampered.stderr

    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["phase3"]["lr_vision"] = 2.0e-5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    changed = _ok(["dvc", "repro"], repo)
    ran = _ran(changed)
    assert ran[0] == "train_phase3"  # only the changed phase and what follows
    assert sorted(ran[1:]) == ["evaluate", "evaluate_cascade", "export", "predict", "register"]
    assert ran.index("evaluate") < ran.index("register") < ran.index("predict")
    assert client.get_model_version_by_alias("defectvlm-adapter", "candidate").version != candidate.version
    assert client.get_model_version_by_alias("defectvlm-adapter", "champion").version == candidate.version
