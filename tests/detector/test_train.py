"""train-detector: the outputs, determinism, ONNX parity, the test split never read, MLflow."""

from __future__ import annotations

import json

import pytest

from defectvlm.config import ConfigError, params_from_dict
from tests.conftest import run_cli
from tests.detector.conftest import detector_params


def test_outputs_and_onnx_parity(detector_dir):
    for name in ("model.pt", "detector.onnx", "detector.json", "metrics.json"):
        assert (detector_dir / name).is_file(), name
    config = json.loads((detector_dir / "detector.json").read_text())
    metrics = json.loads((detector_dir / "metrics.json").read_text())
    assert config["classes"] == metrics["classes"] == sorted(config["classes"])
    assert config["max_boxes"] == 8 and config["input_size"] == 128
    assert metrics["onnx_parity"]["max_rel_diff"] <= 1e-4
    assert metrics["onnx_parity"]["peak_flip_share"] <= 0.01
    assert set(metrics["val"]) >= {"map50", "recall_at_budget", "proposals_per_image"}
    assert metrics["val"]["proposals_per_image"] <= config["max_boxes"]
    assert metrics["onnx_images_per_second"] > 0


def test_training_lowers_the_loss_and_is_deterministic(detector_dir, split_dir, tmp_path):
    metrics = json.loads((detector_dir / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    params = detector_params(tmp_path / "params.yaml", tmp_path / "again")
    assert run_cli("train-detector", "--params", params, "--in", split_dir, "--no-tracking") == 0
    for name in ("model.pt", "detector.onnx", "detector.json"):
        assert (tmp_path / "again" / name).read_bytes() == (detector_dir / name).read_bytes(), name


def test_registered_with_lineage(split_dir, tmp_path, capsys):
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sections = {"tracking": {"uri": store, "experiment": "det"}, "registry": {"model_name": "m"}}
    params = detector_params(tmp_path / "params.yaml", tmp_path / "run", sections, steps=2)
    assert run_cli("train-detector", "--params", params, "--in", split_dir) == 0
    assert "registered as m-detector v1 (@candidate)" in capsys.readouterr().err
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("m-detector", "candidate")
    assert {"git.commit", "data.version", "data.split.train.md5", "data.split.val.md5"} <= set(version.tags)
    assert "metric.val.recall_at_budget" in version.tags
    run = client.get_run(version.run_id)
    assert run.data.params["detector.steps"] == "2" and "val.map50" in run.data.metrics
    files = {f.path for f in client.list_artifacts(version.run_id, "detector")}
    assert "detector/detector.onnx" in files


@pytest.mark.parametrize(
    "section, message",
    [
        ({"crop_size": 256, "input_size": 128}, "detector.crop_size: must be <= input_size"),
        ({"input_size": 100}, "detector.input_size: must be a multiple of 16"),
        ({"confidence": 1.5}, "detector.confidence: must be within [0, 1]"),
        ({"backend": "yolo"}, "detector.backend: must be one of centernet"),
    ],
)
def test_bad_detector_params_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        params_from_dict({"detector": section})


@pytest.mark.parametrize("source", ["detector", "both"])
def test_detector_negatives_without_out_of_fold_models_are_refused_with_the_leakage_rule(source):
    for folds in (0, 1):
        with pytest.raises(ConfigError, match="regions.negatives_folds: .*never trained on it.*out-of-fold"):
            params_from_dict({"regions": {"negatives_from": source, "negatives_folds": folds}})
    assert params_from_dict({"regions": {"negatives_from": source}}).regions.negatives_folds == 3
    random = params_from_dict({"regions": {"negatives_from": "random", "negatives_folds": 1}})
    assert random.regions.negatives_folds == 1  # no detector negatives: nothing to leak
