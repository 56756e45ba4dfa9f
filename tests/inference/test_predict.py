"""defectvlm predict: the training prompt, every region source, unreadable images, bad input."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import requests

from defectvlm.data.images import load_upright
from defectvlm.inference.loading import load_model
from defectvlm.inference.predict import region_prompt_sample
from defectvlm.io import read_jsonl
from tests.conftest import run_cli

N_IMAGES = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory, sft_dir) -> Path:
    """Three test images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("line")
    for sample in read_jsonl(sft_dir / "test.jsonl")[:N_IMAGES]:
        shutil.copy(sample["images"][0], folder / Path(sample["images"][0]).name)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def good_names(images: Path) -> list[str]:
    return sorted(p.name for p in images.iterdir() if p.name != "broken.png")


def predict(out: Path, model: Path, *args) -> int:
    return run_cli("predict", "--model", model, "--out", out, "--quiet", *args)


def records(out: Path) -> dict[str, dict]:
    return {Path(r["image"]).name: r for r in read_jsonl(out / "predictions.jsonl")}


def test_the_prompt_is_built_by_the_training_code_byte_for_byte(trained, sft_dir):
    _, processor, folder = trained
    config = load_model(folder).config
    for sample in read_jsonl(sft_dir / "test.jsonl")[:5]:
        width, height = load_upright(sample["images"][0]).size
        regions = sample["meta"]["regions"]
        built = region_prompt_sample(
            sample["id"],
            sample["images"][0],
            width,
            height,
            [r["xyxy"] for r in regions],
            [(r["label"], r["cls"]) for r in regions],
            config.prompt,
            config.family,
            config.min_pixels,
            config.max_pixels,
            int(regions[0]["rid"][1:]),  # a run of an image's regions (sft.regions_per_prompt) keeps its rids
        )
        assert built["messages"] == sample["messages"]
        render = processor.apply_chat_template
        assert render(built["messages"], tokenize=False) == render(sample["messages"], tokenize=False)


def test_folder_with_an_unreadable_image_default_grid_is_deterministic(trained, images, tmp_path):
    folder = trained[2]
    assert predict(tmp_path / "a", folder, "--images", images) == 0
    found = records(tmp_path / "a")
    assert len(found) == N_IMAGES + 1
    assert found["broken.png"]["verdict"] == "unreadable" and "UnidentifiedImageError" in found["broken.png"]["reason"]
    window = json.loads((folder / "prompt.json").read_text())["window"]
    for name, record in found.items():
        if name == "broken.png":
            continue
        assert record["verdict"] in ("abnormal", "normal") and record["threshold"] == 0.5
        assert record["model"] == {"uri": str(folder), "version": None}
        assert len(record["regions"]) > window["max_regions"]  # several prompts per image
        assert record["score"] == max(r["p_abnormal"] for r in record["regions"])
        assert all(0 <= r["xyxy"][0] < r["xyxy"][2] <= record["width"] for r in record["regions"])
    assert predict(tmp_path / "b", folder, "--images", images) == 0
    for name in ("predictions.jsonl", "predictions.csv", "report.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "Unreadable images" in (tmp_path / "a" / "report.html").read_text()


def test_glob_and_manifest_select_the_same_images(trained, images, tmp_path):
    folder = trained[2]
    names = good_names(images)[:2]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(images / n)}) + "\n" for n in names), encoding="utf-8")
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text("".join(json.dumps({"image": n, "boxes": [{"xyxy": [1, 1, 20, 20]}]}) + "\n" for n in names))
    assert predict(tmp_path / "m", folder, "--images", manifest, "--regions", boxes) == 0
    assert sorted(records(tmp_path / "m")) == names
    pattern = str(images / f"{names[0][:-6]}*")
    assert predict(tmp_path / "g", folder, "--images", pattern, "--regions", boxes) == 0
    assert sorted(records(tmp_path / "g")) == sorted(p.name for p in images.glob(Path(pattern).name))
    assert names[0] in records(tmp_path / "g")


def test_each_region_source_gives_its_boxes(trained, images, tmp_path):
    folder = trained[2]
    names = good_names(images)
    size = {n: load_upright(str(images / n)).size for n in names}
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(
        "".join(
            json.dumps({"image": str(images / n), "boxes": [{"xyxy": [2, 3, 30, 40], "score": 0.9, "cls": "slag"}]})
            + "\n"
            for n in names
        )
    )
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    for n in names:
        (yolo / f"{Path(n).stem}.txt").write_text("0 0.5 0.5 0.2 0.25 0.8\n1 0.2 0.2 0.1 0.1\n")
    studio = tmp_path / "studio.json"
    studio.write_text(
        json.dumps(
            [
                {
                    "data": {"image": f"/data/upload/1/{n}"},
                    "annotations": [
                        {
                            "result": [
                                {
                                    "type": "rectanglelabels",
                                    "value": {"x": 10, "y": 10, "width": 25, "height": 30, "rectanglelabels": ["slag"]},
                                }
                            ]
                        }
                    ],
                }
                for n in names
            ]
        )
    )
    for source, expected in (
        (boxes, lambda w, h: [[2.0, 3.0, 30.0, 40.0]]),
        (
            yolo,
            lambda w, h: [
                [round(0.4 * w, 1), round(0.375 * h, 1), round(0.6 * w, 1), round(0.625 * h, 1)],
                [round(0.15 * w, 1), round(0.15 * h, 1), round(0.25 * w, 1), round(0.25 * h, 1)],
            ],
        ),
        (studio, lambda w, h: [[round(0.1 * w, 1), round(0.1 * h, 1), round(0.35 * w, 1), round(0.4 * h, 1)]]),
    ):
        out = tmp_path / f"out-{source.stem}"
        assert predict(out, folder, "--images", images, "--regions", source) == 0, source
        found = records(out)
        for n in names:
            got = [v for r in found[n]["regions"] for v in r["xyxy"]]
            assert got == pytest.approx([v for box in expected(*size[n]) for v in box], abs=0.11), source
    assert records(tmp_path / "out-yolo")[names[0]]["regions"][0]["proposal"]["score"] == 0.8


@pytest.mark.parametrize(
    ("boxes_line", "message"),
    [
        ('{"image": "X", "boxes": [{"xyxy": [0, 0, 99999, 10]}]}', "outside the"),
        ('{"image": "X", "boxes": [{"xyxy": [0, 0, 10]}]}', "xyxy"),
        ('{"image": "X", "boxes": [{"xyxy": [0, 0, 10, 10]}', "not valid JSON"),
    ],
)
def test_bad_boxes_name_the_file_and_line(trained, images, tmp_path, capsys, boxes_line, message):
    name = good_names(images)[0]
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text('{"image": "other.png", "boxes": []}\n' + boxes_line.replace("X", name) + "\n")
    assert predict(tmp_path / "out", trained[2], "--images", images, "--regions", boxes) == 1
    err = capsys.readouterr().err
    assert f"{boxes}:2" in err and message in err and "Traceback" not in err


def test_bad_model_images_and_sources_exit_with_a_message(trained, images, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict(tmp_path / "o", tmp_path / "no-such-run", "--images", images) == 1
    assert "no-such-run: no such folder" in capsys.readouterr().err
    assert predict(tmp_path / "o", trained[2], "--images", empty) == 1
    assert f"{empty}: no images found" in capsys.readouterr().err
    assert predict(tmp_path / "o", trained[2], "--images", images, "--proposals", "detector", "--detector", empty) == 1
    assert "a folder needs detector.json and detector.onnx" in capsys.readouterr().err
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow

    mlflow.MlflowClient(tracking_uri=store).create_registered_model("m")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert predict(tmp_path / "o", "models:/m@champion", "--images", images) == 1
    assert "has no alias @champion of m" in capsys.readouterr().err


def test_serve_sends_the_model_the_prompts_predict_sends_and_answers_the_same_records(
    trained, images, tmp_path, monkeypatch
):
    """The same image (its default grid, then given boxes) through `predict` and through
    /v1/inspect: every sample of the scoring pass renders to the same bytes with the same
    pixels, and the records agree (scores within 1e-6). The model's threshold is set to the
    median region score so flagged and normal regions are mixed."""
    import defectvlm.inference.predict as predict_module
    from defectvlm.config import ServeParams, load_params
    from defectvlm.serve.app import create_app
    from defectvlm.serve.model import load_scorer
    from tests.conftest import REPO
    from tests.serve.conftest import b64, running

    processor = trained[1]
    folder = tmp_path / "model"
    shutil.copytree(trained[2], folder)
    name = good_names(images)[0]
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(images / name, one / name)
    boxes = [[2, 3, 300, 240], [400, 100, 900, 500], [10, 500, 200, 580]]
    boxes_file = tmp_path / "boxes.jsonl"
    boxes_file.write_text(json.dumps({"image": name, "boxes": [{"xyxy": b} for b in boxes]}) + "\n")

    sent: list[tuple[str, bytes]] = []
    score_samples = predict_module.score_samples

    def recording(model, processor_, samples, classes, batch_size):
        for sample in samples:
            text = processor.apply_chat_template(sample["messages"], tokenize=False)
            sent.append((text, load_upright(sample["images"][0]).tobytes()))
        return score_samples(model, processor_, samples, classes, batch_size)

    monkeypatch.setattr(predict_module, "score_samples", recording)

    def by_predict(*regions) -> tuple[dict, list]:
        sent.clear()
        out = tmp_path / f"predict{len(list(tmp_path.glob('predict*')))}"
        # all of the image's prompts in one forward per call of the scoring pass, as serve scores a
        # lone request (another batching moves scores ~1e-7 through padding and the shared prefix)
        assert predict(out, folder, "--images", one, "--batch-size", 64, *regions) == 0
        return records(out)[name], list(sent)

    def by_serve(url: str, body: dict) -> tuple[dict, list]:
        sent.clear()
        response = requests.post(f"{url}/v1/inspect", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json(), list(sent)

    first_pass = [r["p_abnormal"] for r in by_predict()[0]["regions"]]  # the threshold does not change them
    inference = json.loads((folder / "inference.json").read_text())
    (folder / "inference.json").write_text(json.dumps({**inference, "threshold": statistics.median(first_pass)}))
    grid_predicted, grid_prompts = by_predict()
    boxes_predicted, boxes_prompts = by_predict("--regions", boxes_file)
    picture = b64((one / name).read_bytes())
    # the grid is many prompts: a loaded CI machine needs more than the default 30 s request timeout
    app = create_app(
        ServeParams(request_timeout_s=600), lambda: load_scorer(str(folder), load_params(REPO / "params.yaml"))
    )
    with running(app) as url:
        grid_served, grid_served_prompts = by_serve(url, {"image": picture})
        boxes_served, boxes_served_prompts = by_serve(url, {"image": picture, "boxes": [{"xyxy": b} for b in boxes]})

    window = json.loads((folder / "prompt.json").read_text())["window"]
    assert len(grid_predicted["regions"]) > window["max_regions"]  # several prompts for the one image
    flagged = [r for r in grid_predicted["regions"] if r["class_probs"]]
    assert 0 < len(flagged) < len(grid_predicted["regions"])  # flagged and normal regions mixed
    # one scoring pass: one prompt per window of at most max_regions regions, the same bytes from both
    windows = -(-len(grid_predicted["regions"]) // window["max_regions"])
    assert grid_served_prompts == grid_prompts and len(grid_prompts) == windows > 1
    assert boxes_served_prompts == boxes_prompts and boxes_prompts
    for predicted, served in ((grid_predicted, grid_served), (boxes_predicted, boxes_served)):
        assert served["image"] is None and predicted["image"] == str(one / name)
        assert set(served) == set(predicted)
        for key in ("verdict", "threshold", "model", "width", "height"):
            assert served[key] == predicted[key], key
        assert served["score"] == pytest.approx(predicted["score"], abs=1e-6)
        assert len(served["regions"]) == len(predicted["regions"])
        for mine, theirs in zip(served["regions"], predicted["regions"], strict=True):
            assert (mine["id"], mine["xyxy"], mine["cls"]) == (theirs["id"], theirs["xyxy"], theirs["cls"])
            assert mine["p_abnormal"] == pytest.approx(theirs["p_abnormal"], abs=1e-6)
            assert mine["class_probs"] == (theirs["class_probs"] and pytest.approx(theirs["class_probs"], abs=1e-6))
    assert [r["proposal"]["from"] for r in boxes_served["regions"]] == ["request"] * 3
    assert [r["proposal"] for r in grid_served["regions"]] == [r["proposal"] for r in grid_predicted["regions"]]


def test_an_alias_alone_names_the_registered_model_of_the_params(tmp_path):
    from defectvlm.config import load_params
    from defectvlm.step_functions import model_uri

    (tmp_path / "params.yaml").write_text(
        f"registry:\n  model_name: weld-line-3\ntracking:\n  uri: sqlite:///{tmp_path}/m.db\n", encoding="utf-8"
    )
    params = load_params(tmp_path / "params.yaml")
    assert model_uri(params, "@champion") == ("models:/weld-line-3@champion", f"sqlite:///{tmp_path}/m.db")
    assert model_uri(params, "runs/phase3") == ("runs/phase3", None)


def test_a_registration_record_names_the_version_it_registered(tmp_path, capsys):
    """What the DVC stages and KFP tasks pass: register's registration.json (or its folder)."""
    from defectvlm.config import load_params
    from defectvlm.step_functions import model_uri

    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: sqlite:///{tmp_path}/m.db\n", encoding="utf-8")
    params = load_params(tmp_path / "params.yaml")
    record = tmp_path / "reports" / "registration.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"name": "weld", "version": "7", "alias": None}), encoding="utf-8")
    expected = ("models:/weld/7", f"sqlite:///{tmp_path}/m.db")
    assert model_uri(params, str(record)) == expected
    assert model_uri(params, str(record.parent)) == expected  # a KFP artifact is its folder
    record.write_text("{}", encoding="utf-8")
    images = tmp_path / "none"
    assert predict(tmp_path / "o", record, "--images", images, "--params", tmp_path / "params.yaml") == 1
    assert f"{record}: not a registration record" in capsys.readouterr().err


@pytest.mark.parametrize("one_region", [False, True])
def test_one_pass_judges_each_region_with_the_regions_before_it_normal(
    trained, trained_one_region, images, monkeypatch, one_region
):
    """Threshold 0 flags every region; their P(abnormal) and classes all come from one call of
    the scoring pass and equal the slow reference (one forward per alternative) of the answer
    in which that region alone is abnormal. A model trained on one region per prompt
    (sft.regions_per_prompt: 1) is asked about each region alone, its rid kept (R1, R2, R3)."""
    import defectvlm.inference.predict as predict_module
    from defectvlm.inference.predict import ImageToJudge, judge_images
    from defectvlm.inference.sources import Region
    from tests.evaluate.test_scoring import slow_reference

    loaded = load_model(trained_one_region if one_region else trained[2])
    config = loaded.config
    if one_region:
        assert config.prompt["window"]["max_regions"] == 1
    path = str(images / good_names(images)[0])
    width, height = load_upright(path).size
    boxes = [(2.0, 3.0, 300.0, 240.0), (400.0, 100.0, 900.0, 500.0), (10.0, 500.0, 200.0, 580.0)]
    calls = []
    score_samples = predict_module.score_samples
    monkeypatch.setattr(predict_module, "score_samples", lambda *a, **k: calls.append(1) or score_samples(*a, **k))
    judged = ImageToJudge(path, path, width, height, [Region(box, "test") for box in boxes])
    record = judge_images(loaded, [judged], threshold=0.0)[0]
    assert len(calls) == 1
    size = config.prompt["window"]["max_regions"]  # the regions per prompt the model was trained with
    counting = bool(config.prompt["sft"].get("regions_per_prompt"))
    for k, region in enumerate(record["regions"]):
        first = k - k % size
        chunk = boxes[first : first + size]
        labels = [("normal", None)] * len(chunk)
        labels[k - first] = ("abnormal", config.classes[0])
        number = first + 1 if counting else 1
        sample = region_prompt_sample(
            "alone",
            path,
            width,
            height,
            chunk,
            labels,
            config.prompt,
            config.family,
            config.min_pixels,
            config.max_pixels,
            number,
        )
        expected = slow_reference(loaded.model, loaded.processor, sample, config.classes)[f"R{number + k - first}"]
        assert region["p_abnormal"] == pytest.approx(expected["score"], abs=1e-5)
        assert region["class_probs"] == pytest.approx(expected["class_probs"], abs=1e-5)
        assert region["cls"] == max(expected["class_probs"], key=expected["class_probs"].get)


def test_serve_s_one_batch_is_never_split_across_calls(trained_one_region, images, monkeypatch):
    """batch_size None (serve: every prompt of a batch of requests together) scores all the
    prompts in one call of the scoring pass, however many there are; predict's batches of 8 come
    two to a call."""
    import defectvlm.inference.predict as predict_module
    from defectvlm.inference.predict import ImageToJudge, judge_images
    from defectvlm.inference.sources import Region

    loaded = load_model(trained_one_region)
    path = str(images / good_names(images)[0])
    width, height = load_upright(path).size
    boxes = [(10.0 + 30 * k, 20.0, 60.0 + 30 * k, 90.0) for k in range(20)]  # 20 one-region prompts
    calls = []
    score_samples = predict_module.score_samples
    monkeypatch.setattr(
        predict_module,
        "score_samples",
        lambda m, p, samples, *a: calls.append(len(samples)) or score_samples(m, p, samples, *a),
    )
    judged = ImageToJudge(path, path, width, height, [Region(box, "test") for box in boxes])
    served = judge_images(loaded, [judged], threshold=0.5, batch_size=None)[0]
    assert calls == [20]
    calls.clear()
    predicted = judge_images(loaded, [judged], threshold=0.5)[0]
    assert calls == [16, 4]
    assert [r["p_abnormal"] for r in served["regions"]] == pytest.approx(
        [r["p_abnormal"] for r in predicted["regions"]], abs=1e-5
    )
