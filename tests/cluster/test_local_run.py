"""`defectvlm pipeline run --local`: the whole KFP DAG on demo data with kfp.local's SubprocessRunner."""

from __future__ import annotations

import json

import pytest
import yaml

from defectvlm.data.demo import generate_demo
from defectvlm.io import read_jsonl
from tests.conftest import REPO, read_json, run_cli, write_params

pytestmark = pytest.mark.slow


def test_local_pipeline_run_prepares_the_same_data_as_the_cli_trains_evaluates_and_registers_a_candidate(
    tmp_path, monkeypatch
):
    """Phase 2 is disabled (a shorter run): phase 3 must start from phase 1's artifact."""
    raw = tmp_path / "raw"
    generate_demo(raw, n_abnormal=12, n_normal=8)
    params = write_params(
        tmp_path / "params.yaml",
        {
            "data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")},
            "train": {
                "deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json"),
                "batch_size": 2,
                "eval_steps": 100,
                "save_steps": 100,
                "metric_for_best_model": "eval_loss",
                "greater_is_better": False,
                "phase1": {"max_steps": 1},
                "phase2": {"enabled": False},
                "phase3": {"max_steps": 1},
            },
            # the detector's shape is all this test needs (the params' 2200 steps at 512 px took most of its time)
            "detector": {"steps": 2, "input_size": 64, "crop_size": 32, "width": 4, "threads": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "kfp-local"},
            "registry": {"model_name": "kfp-local-adapter"},
        },
    )
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store (./mlruns) lands here

    assert run_cli("pipeline", "run", "--local", "--params", params, "--root", tmp_path / "kfp") == 0

    (outputs,) = (tmp_path / "kfp" / "outputs").iterdir()
    registration = read_json(outputs / "register" / "registration" / "registration.json")
    assert registration["name"] == "kfp-local-adapter" and registration["alias"] == "candidate"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    candidate = client.get_model_version_by_alias("kfp-local-adapter", "candidate")
    assert str(candidate.version) == str(registration["version"]) and candidate.run_id == registration["run_id"]
    metrics = read_json(outputs / "evaluate" / "reports" / "metrics.json")
    assert metrics["split"] == "test" and metrics["run"].endswith("phase3")
    cascade = read_json(outputs / "evaluate-cascade" / "cascade" / "cascade_metrics.json")  # its own component
    assert cascade["split"] == "test" and cascade["images"] == len(
        read_jsonl(outputs / "split" / "splits" / "test.jsonl")
    )

    # then the registered version predicts the test images, is exported (parity tagged on it) and
    # its InferenceServices are rendered, the vLLM one on the export artifact
    predicted = read_jsonl(outputs / "predict" / "predictions" / "predictions.jsonl")
    test_split = read_jsonl(outputs / "split" / "splits" / "test.jsonl")
    assert len(predicted) == len(test_split) and {r["verdict"] for r in predicted} <= {"abnormal", "normal"}
    assert {str(r["model"]["version"]) for r in predicted} == {str(registration["version"])}
    assert read_json(outputs / "export" / "exported" / "defectvlm.json")["parity"]["passed"]
    tagged = client.get_model_version("kfp-local-adapter", registration["version"]).tags["export.parity"]
    assert json.loads(tagged)["passed"]
    deployment = outputs / "deploy" / "deployment"
    service = yaml.safe_load((deployment / "inferenceservice.yaml").read_text(encoding="utf-8"))
    model = f"models:/kfp-local-adapter/{registration['version']}"
    assert service["spec"]["predictor"]["containers"][0]["args"][:2] == ["--model", model]
    vllm = yaml.safe_load((deployment / "inferenceservice-vllm.yaml").read_text(encoding="utf-8"))
    assert vllm["spec"]["predictor"]["model"]["storageUri"].endswith("export/exported")

    # the components ran the CLI's steps with the same parameters: the same files come out
    cli = tmp_path / "cli"
    assert run_cli("ingest", "--params", params, "--out", cli / "01", "--quiet") == 0
    for step, source, target in (("split", "01", "02"), ("regions", "02", "03"), ("build-sft", "03", "04")):
        assert run_cli(step, "--params", params, "--in", cli / source, "--out", cli / target) == 0
    for split in ("train", "val", "test"):
        produced = (outputs / "sft" / "conversations" / f"{split}.jsonl").read_bytes()
        assert produced == (cli / "04" / f"{split}.jsonl").read_bytes(), split

    # phases train on the workspace; their adapters travel as artifacts, without checkpoints
    (run,) = (tmp_path / "kfp" / "workspace" / "runs").iterdir()
    adapters = {n: outputs / f"train-phase{n}" / "adapter" for n in (1, 2, 3)}
    assert (adapters[1] / "best" / "adapter_model.safetensors").exists()
    assert not (adapters[2] / "best").exists()  # disabled
    assert read_json(adapters[3] / "phase.json")["starts_from"] == str(run / "phase1" / "best")
    assert (run / "phase3" / "best" / "adapter_model.safetensors").exists()
