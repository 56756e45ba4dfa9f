"""register and promote against a real MLflow store (sqlite), with a real adapter and evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow

from defectvlm.config import load_params
from defectvlm.tracking.lineage import file_md5
from tests.conftest import read_json, run_cli

NAME = "defectvlm-adapter"


def client(work: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=load_params(work / "params.yaml").tracking.uri)


def register(work: Path, roi_f1: float | None = None, auroc: float | None = None, sft: str = "sft") -> str:
    """Register the run with its evaluation, optionally with other test figures (as another run would score)."""
    reports = work / "reports"
    if roi_f1 is not None:
        reports = work / f"reports_{roi_f1}_{auroc}_{sft}"
        shutil.copytree(work / "reports", reports, dirs_exist_ok=True)
        metrics = read_json(reports / "metrics.json")
        metrics["test"]["roi"]["f1"], metrics["test"]["image"]["auroc"] = roi_f1, auroc
        (reports / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    out = reports / "registration.json"
    assert run_cli("register", "--in", work / sft, "--reports", reports, "--out", out) == 0
    return read_json(out)["version"]


def promote(*args: str) -> int:
    return run_cli("promote", "-S", "registry.gates={roi.f1: 0.2, image.auroc: 0.5}", *args)


def test_register_ships_the_adapter_only_and_leads_back_to_commit_and_data(workspace):
    version = register(workspace)
    mv = client(workspace).get_model_version_by_alias(NAME, "candidate")
    assert mv.version == version
    metrics = read_json(workspace / "reports" / "metrics.json")
    inference = read_json(workspace / "reports" / "inference.json")
    assert float(mv.tags["metric.test.roi.f1"]) == metrics["test"]["roi"]["f1"]
    assert float(mv.tags["threshold"]) == inference["threshold"]
    assert mv.tags["base_model"] == "tiny"
    for split in ("train", "val", "test"):
        assert mv.tags[f"data.sft.{split}.md5"] == file_md5(workspace / "sft" / f"{split}.jsonl")

    # lineage: version -> register run -> pipeline run -> commit; the commit is the repository's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout.strip()
    c = client(workspace)
    register_run = c.get_run(mv.run_id)
    pipeline = c.get_run(register_run.data.tags["mlflow.parentRunId"])
    assert pipeline.info.run_id == mv.tags["pipeline_run_id"]
    assert pipeline.data.tags["git.commit"] == head == mv.tags["git.commit"]
    assert pipeline.data.tags["git.dirty"] == "false"
    inputs = {d.dataset.name: d.dataset.digest for d in register_run.inputs.dataset_inputs}
    assert inputs == {"sft.test": mv.tags["data.sft.test.md5"]}

    # adapter only: the LoRA files, the trained projector, processor and inference config; no base weights
    files = {Path(f.path).name for f in c.list_artifacts(mv.run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "prompt.json", "inference.json"} <= files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files)
    local = Path(
        mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", tracking_uri=c.tracking_uri)
    )
    assert json.loads((local / "inference.json").read_text())["threshold"] == inference["threshold"]


def test_promote_gates_compare_on_the_same_test_set_and_keep_history(workspace):
    c = client(workspace)
    first = register(workspace, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    below_gate = register(workspace, roi_f1=0.1, auroc=0.9)
    assert promote() == 1
    worse = register(workspace, roi_f1=0.45, auroc=0.8)
    assert promote("--version", worse) == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    other_sft = workspace / "sft_other"
    shutil.copytree(workspace / "sft", other_sft)
    lines = (other_sft / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (other_sft / "test.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    elsewhere = register(workspace, roi_f1=0.9, auroc=0.95, sft="sft_other")
    assert promote() == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    better = register(workspace, roi_f1=0.6, auroc=0.7)
    assert promote() == 0
    assert c.get_model_version_by_alias(NAME, "champion").version == better
    old = c.get_model_version(NAME, first)
    assert old.current_stage == "None" and json.loads(old.tags["retired.champion"])["version"] == better
    assert json.loads(old.tags["promoted.champion"])["version"] == first

    assert promote("--version", below_gate, "--force") == 1  # a forced promotion needs a reason
    assert promote("--version", below_gate, "--force", "--reason", "line 3 needs slag recall now") == 0
    forced = json.loads(c.get_model_version(NAME, below_gate).tags["promoted.champion"])
    assert forced["forced"] and forced["reason"] == "line 3 needs slag recall now" and forced["overridden"]
    history = json.loads(c.get_registered_model(NAME).tags["history.champion"])
    assert [h["version"] for h in history] == [first, better, below_gate]
    assert [h["previous"] for h in history] == [None, first, better]
    assert elsewhere not in {h["version"] for h in history}


def test_promote_refusal_names_each_reason(workspace, capsys):
    register(workspace, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    register(workspace, roi_f1=0.1, auroc=0.6)
    assert promote() == 1
    err = capsys.readouterr().err
    assert "roi.f1 = 0.1000 is below the gate 0.2" in err
    assert "test roi.f1 = 0.1000 is below @champion v1's 0.5000" in err
    assert "test image.auroc = 0.6000 is below @champion v1's 0.7000" in err
    assert "Traceback" not in err
