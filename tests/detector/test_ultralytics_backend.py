"""detector.backend: ultralytics: the missing extra's message, and (where the extra is installed, as in
CI) an offline from-scratch training on a few generated images into centernet's outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from defectvlm.config import load_params
from defectvlm.detector.loading import open_detector
from defectvlm.detector.runtime import OnnxDetector
from defectvlm.detector.train import train_detector
from defectvlm.detector.ultralytics_backend import (
    MISSING,
    OFFLINE_ENV,
    check_model_config,
    import_ultralytics,
    write_dataset,
)
from defectvlm.errors import StepFailure
from defectvlm.io import read_splits
from tests.conftest import run_cli
from tests.detector.conftest import detector_params

TINY = {"backend": "ultralytics", "input_size": 64, "steps": 1, "batch_size": 4, "confidence": 0.001}
COLOURS = {"dark": (25, 25, 25), "light": (235, 235, 235)}


def write_split(folder: Path) -> Path:
    """train (6 images with a box, 1 normal) and val (3): a dark or light rectangle on grey. No test.jsonl."""
    for split, count in (("train", 7), ("val", 3)):
        rows = []
        for i in range(count):
            image = Image.new("RGB", (96, 80), (128, 128, 128))
            boxes = []
            if not (split == "train" and i == count - 1):
                cls = ("dark", "light")[i % 2]
                xyxy = [8.0 + 7 * i, 10.0 + 4 * i, 44.0 + 7 * i, 38.0 + 4 * i]
                ImageDraw.Draw(image).rectangle(xyxy, fill=COLOURS[cls])
                boxes.append({"xyxy": xyxy, "cls": cls})
            path = folder / "images" / f"{split}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            rows.append({"id": f"{split}/{i}.png", "path": str(path), "width": 96, "height": 80, "boxes": boxes})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def block_network(monkeypatch) -> list:
    """Every name lookup or connection attempt is recorded and refused (Ultralytics swallows the errors)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_missing_ultralytics_says_how_to_install_and_what_the_licence_means(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` raises ImportError
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    split = write_split(tmp_path / "split")
    params = detector_params(tmp_path / "params.yaml", tmp_path / "run", **TINY)
    with pytest.raises(StepFailure) as info:
        train_detector(load_params(params), split)
    assert str(info.value) == MISSING
    assert 'pip install "defectvlm[ultralytics]"' in MISSING and "AGPL-3.0" in MISSING
    assert all(os.environ[k] == v for k, v in OFFLINE_ENV.items())  # set before the import
    assert not (tmp_path / "run").exists()  # failed before writing anything

    assert run_cli("train-detector", "--params", params, "--in", split, "--no-tracking") == 1
    err = capsys.readouterr().err
    assert "error: " in err and "AGPL-3.0" in err and "Traceback" not in err
    assert 'pip install "defectvlm[ultralytics]"' in " ".join(err.split())  # brackets printed, not read as markup


def import_offline(monkeypatch) -> list:
    """Network blocked, ultralytics imported the backend's way (offline, process globals put back), or a skip."""
    attempts = block_network(monkeypatch)
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip('the optional extra: pip install "defectvlm[ultralytics]" (AGPL-3.0)')
    import_ultralytics()
    return attempts


@pytest.mark.parametrize(
    "model, message", [("nosuch.yaml", "no model config 'nosuch.yaml'"), ("https://example.com/m.yaml", "is a URL")]
)
def test_a_model_config_must_be_local(model, message, monkeypatch):
    attempts = import_offline(monkeypatch)
    with pytest.raises(StepFailure, match=message):
        check_model_config(model)
    assert attempts == []


def test_trains_from_scratch_offline_into_centernet_s_outputs(tmp_path, monkeypatch):
    attempts = import_offline(monkeypatch)
    split = write_split(tmp_path / "split")
    params = detector_params(tmp_path / "params.yaml", tmp_path / "run", **TINY)
    scratch = set(Path(tempfile.gettempdir()).glob("defectvlm-yolo-*"))  # left by a run killed earlier, if any
    assert run_cli("train-detector", "--params", params, "--in", split, "--no-tracking") == 0
    out = tmp_path / "run"

    config = json.loads((out / "detector.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["backend"] == "ultralytics" and config["model"] == "yolo11n.yaml"
    assert config["classes"] == metrics["classes"] == ["dark", "light"] and config["input_size"] == 64
    assert metrics["epochs"] == 1 and metrics["steps"] == 2  # ceil(7 images / 4)
    assert set(metrics["val"]) >= {"map50", "recall_at_budget", "proposals_per_image"}
    assert 0 < metrics["val"]["proposals_per_image"] <= config["max_boxes"]
    assert metrics["onnx_parity"]["max_rel_diff"] <= 1e-3 and metrics["onnx_images_per_second"] > 0
    assert not (out / "model.pt").exists()

    detector = OnnxDetector(out / "detector.onnx")  # the Ultralytics export, read by our runtime
    assert detector.classes == ["dark", "light"] and (detector.width, detector.height) == (64, 64)
    image = Image.open(split / "images" / "val_0.png")
    found = open_detector(str(out), load_params(params)).propose(image)
    assert found and all(d.cls in COLOURS and 0 <= d.xyxy[0] < d.xyxy[2] <= 96 for d in found)

    assert sorted(p.name for p in out.iterdir()) == ["detector.json", "detector.onnx", "metrics.json", "ultralytics"]
    assert set(Path(tempfile.gettempdir()).glob("defectvlm-yolo-*")) == scratch  # the dataset copy is gone

    splits = read_splits(split, ("train", "val"))
    data_yaml = write_dataset(splits, ["dark", "light"], 8.0, tmp_path / "dataset").read_text()
    assert data_yaml.startswith("train: images/train\nval: images/val\nnames:")  # test never written
    assert (tmp_path / "dataset" / "labels" / "train" / "train" / "6.txt").read_text() == ""  # the normal image

    # importing ultralytics patched PIL.Image.open, torch.save and numpy's print options: all put back
    from defectvlm.data.images import probe_bytes

    assert probe_bytes(b"hello").error == "not_an_image" and str(np.array([0.5])) == "[0.5]"

    again = detector_params(tmp_path / "again.yaml", tmp_path / "again", **TINY)
    assert run_cli("train-detector", "--params", again, "--in", split, "--no-tracking") == 0
    assert (tmp_path / "again" / "detector.onnx").read_bytes() == (out / "detector.onnx").read_bytes()
    assert attempts == []
