"""predict --proposals detector: a detector's boxes become the regions of the training prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defectvlm.config import load_params
from defectvlm.data.images import load_upright
from defectvlm.detector.runtime import OnnxDetector
from defectvlm.io import read_jsonl
from tests.conftest import run_cli, write_params
from tests.detector.test_runtime import CANDIDATES, NAMES, SIZE
from tests.detector.yolo_graph import write_yolo_onnx
from tests.inference.conftest import trained  # noqa: F401  (the adapter fixture)


def predict(out: Path, model: Path, image: Path, *args) -> int:
    folder = out.parent / f"{out.name}-images"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(image, folder / image.name)
    return run_cli("predict", "--model", model, "--images", folder, "--out", out, "--quiet", *args)


def test_a_factory_yolo_onnx_proposes_the_regions(trained, sft_dir, tmp_path):  # noqa: F811
    images = sft_dir.parent / "raw" / "abnormal_root"
    yolo = write_yolo_onnx(tmp_path / "factory.onnx", CANDIDATES, SIZE, NAMES)
    params = write_params(tmp_path / "params.yaml", {"detector": {"confidence": 0.05}})
    one = sorted(images.rglob("*.jpg"))[0]
    args = ("--params", params, "--proposals", "detector", "--detector", yolo)
    assert predict(tmp_path / "out", trained[2], one, *args) == 0
    (record,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    expected = OnnxDetector(yolo).detect(load_upright(str(one)), 0.05, 0.5, 8)
    assert [r["xyxy"] for r in record["regions"]] == [list(d.xyxy) for d in expected]
    assert [(r["proposal"]["score"], r["proposal"]["cls"]) for r in record["regions"]] == [
        (d.score, d.cls) for d in expected
    ]
    assert all(r["proposal"]["from"] == f"detector {yolo}" for r in record["regions"])
    assert [d.cls for d in expected] == ["scratch", "dent"]


def test_the_registered_detector_is_the_default(
    trained,  # noqa: F811
    detector_dir,
    split_dir,
    sft_dir,
    tmp_path,
    capsys,
):
    from defectvlm.detector.tracking import log_and_register

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sections = {"tracking": {"uri": store, "experiment": "p"}, "registry": {"model_name": "line"}}
    params = write_params(tmp_path / "params.yaml", {**sections, "detector": {"confidence": 0.99}})
    one = sorted((sft_dir.parent / "raw" / "abnormal_root").rglob("*.jpg"))[0]
    assert predict(tmp_path / "o", trained[2], one, "--params", params, "--proposals", "detector") == 1
    assert "has no alias @candidate of line-detector" in capsys.readouterr().err
    metrics = json.loads((detector_dir / "metrics.json").read_text())
    log_and_register(load_params(params), split_dir, detector_dir, metrics)
    assert predict(tmp_path / "o", trained[2], one, "--params", params, "--proposals", "detector") == 0
    (record,) = read_jsonl(tmp_path / "o" / "predictions.jsonl")
    config = json.loads((detector_dir / "detector.json").read_text())
    # the registered detector.json's confidence (0.001), not params.yaml's 0.99
    assert 1 <= len(record["regions"]) <= config["max_boxes"]
    assert all(r["proposal"]["from"] == "detector models:/line-detector@candidate" for r in record["regions"])
    assert all(r["proposal"]["score"] >= config["confidence"] for r in record["regions"])


def test_detector_without_proposals_is_refused(trained, sft_dir, tmp_path, capsys):  # noqa: F811
    one = sorted((sft_dir.parent / "raw" / "abnormal_root").rglob("*.jpg"))[0]
    assert predict(tmp_path / "o", trained[2], one, "--detector", tmp_path / "x.onnx") == 2
    assert "--detector goes with --proposals detector" in capsys.readouterr().err
    assert predict(tmp_path / "o", trained[2], one, "--proposals", "detector", "--detector", tmp_path / "x.onnx") == 1
    assert f"{tmp_path / 'x.onnx'}: no such ONNX file" in capsys.readouterr().err
