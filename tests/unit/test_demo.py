from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
from PIL import Image, ImageOps

from defectvlm.config import load_params
from defectvlm.data.demo import DEFAULT_COUNT, DEFECT_CLASSES, DemoSummary, generate_demo
from defectvlm.data.demo.items import ABNORMAL, NORMAL, ItemJob
from defectvlm.data.split import split_manifest

FULLWIDTH_SEMICOLON = "\uff1b"
RAW_TO_CLASS = {raw: cls for cls, raw in DEFECT_CLASSES.items()}
# Seed 20 with 30 abnormal images stores at least one image under each EXIF tag 6, 8 and 3.
ROTATION_SEED = 20


@pytest.fixture(scope="module")
def semicolon_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    out = tmp_path_factory.mktemp("semicolon_demo")
    return out, generate_demo(out, seed=ROTATION_SEED, n_abnormal=30, n_normal=4)


def read_truth(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "demo_truth.jsonl").read_text("utf-8").splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def displayed_grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("L"), dtype=np.float32)


def local_contrast(grey: np.ndarray, xyxy: list[int], pad: int = 12) -> float:
    """Mean deviation inside the box relative to the bed's own variation in a ring around it."""
    x1, y1, x2, y2 = xyxy
    height, width = grey.shape
    ox1, oy1, ox2, oy2 = (
        max(0, x1 - pad),
        max(0, y1 - pad),
        min(width, x2 + pad),
        min(height, y2 + pad),
    )
    ring_mask = np.ones((oy2 - oy1, ox2 - ox1), dtype=bool)
    ring_mask[y1 - oy1 : y2 - oy1, x1 - ox1 : x2 - ox1] = False
    ring = grey[oy1:oy2, ox1:ox2][ring_mask]
    bed_level = np.median(ring)
    return float(np.abs(grey[y1:y2, x1:x2] - bed_level).mean() / np.abs(ring - bed_level).mean())


def decode_label(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8-sig"), ("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError:
        return data.decode("gbk"), "gbk"


def parse_semicolon(text: str) -> tuple[set[str], list[tuple[str, tuple[int, ...]]]]:
    filenames: set[str] = set()
    boxes: list[tuple[str, tuple[int, ...]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = re.split(f"[;{FULLWIDTH_SEMICOLON}]", line)
        filenames.add(PureWindowsPath(fields[0].strip()).name)
        numbers = [int(n) for n in re.findall(r"\d+", " ".join(fields[1:-1]))]
        assert len(numbers) % 4 == 0, line
        cls = RAW_TO_CLASS[fields[-1].strip()]
        boxes += [(cls, tuple(numbers[i : i + 4])) for i in range(0, len(numbers), 4)]
    return filenames, boxes


def truth_boxes(record: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(box["cls"], tuple(box["xyxy"])) for box in record["boxes"]]


def test_same_arguments_give_byte_identical_trees(tmp_path: Path) -> None:
    first = generate_demo(tmp_path / "a", seed=5, n_abnormal=4, n_normal=3)
    second = generate_demo(tmp_path / "b", seed=5, n_abnormal=4, n_normal=3)
    other_seed = generate_demo(tmp_path / "c", seed=6, n_abnormal=4, n_normal=3)

    assert first == second
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert other_seed.files_written == first.files_written
    assert read_truth(tmp_path / "c") != read_truth(tmp_path / "a")


def test_worker_count_does_not_change_any_byte(tmp_path: Path) -> None:
    generate_demo(tmp_path / "one", seed=2, n_abnormal=6, n_normal=4, label_format="yolo")
    generate_demo(tmp_path / "two", seed=2, n_abnormal=6, n_normal=4, label_format="yolo", workers=2)

    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_no_temporary_files_are_left_behind(semicolon_demo: tuple[Path, DemoSummary]) -> None:
    out, _ = semicolon_demo
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_summary_counts_match_files_on_disk(semicolon_demo: tuple[Path, DemoSummary]) -> None:
    out, summary = semicolon_demo
    truth = read_truth(out)
    all_files = [p for p in out.rglob("*") if p.is_file()]

    assert len(list((out / "abnormal_root").rglob("*.jpg"))) == summary.n_abnormal == 30
    assert len(list((out / "normal_root").rglob("*.jpg"))) == summary.n_normal == 4
    assert summary.files_written == len(all_files) == 30 * 2 + 4 + 2
    assert summary.n_boxes == sum(len(record["boxes"]) for record in truth)
    counts = Counter(box["cls"] for record in truth for box in record["boxes"])
    assert summary.boxes_per_class == {cls: counts[cls] for cls in DEFECT_CLASSES}
    assert json.loads((out / "demo_summary.json").read_text("utf-8")) == {
        "n_abnormal": 30,
        "n_normal": 4,
        "n_boxes": summary.n_boxes,
        "boxes_per_class": summary.boxes_per_class,
        "label_format": "semicolon",
        "files_written": summary.files_written,
    }


def test_layout_spreads_uniquely_named_images_over_batches(
    semicolon_demo: tuple[Path, DemoSummary],
) -> None:
    out, _ = semicolon_demo
    truth = read_truth(out)
    paths = [record["path"] for record in truth]

    assert paths == sorted(paths)
    assert len({Path(p).name for p in paths}) == len(paths)
    # 30 abnormal images fill the first 30 batch folders, one each; the 4 normal ones share the first 4
    assert {Path(p).parent.name for p in paths} == {f"batch_{i:02d}" for i in range(1, 31)}
    for record in truth:
        image = out / record["path"]
        assert image.is_file()
        assert image.with_suffix(".txt").is_file() == (record["label"] == "abnormal")
        expected_root = "abnormal_root" if record["label"] == "abnormal" else "normal_root"
        assert record["path"].startswith(expected_root + "/")


def test_truth_boxes_are_inside_the_image_and_apart(
    semicolon_demo: tuple[Path, DemoSummary],
) -> None:
    out, _ = semicolon_demo
    for record in read_truth(out):
        assert 640 <= record["width"] <= 1600 and 600 <= record["height"] <= 1200
        boxes = [box["xyxy"] for box in record["boxes"]]
        if record["label"] == "normal":
            assert boxes == []
            continue
        assert 1 <= len(boxes) <= 4
        for box in record["boxes"]:
            x1, y1, x2, y2 = box["xyxy"]
            assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
            assert box["raw"] == DEFECT_CLASSES[box["cls"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert iou(a, b) < 0.1


def iou(a: list[int], b: list[int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def test_displayed_size_matches_truth_for_rotated_and_upright_images(
    semicolon_demo: tuple[Path, DemoSummary],
) -> None:
    out, _ = semicolon_demo
    truth = read_truth(out)
    for record in truth:
        with Image.open(out / record["path"]) as image:
            assert image.getexif().get(0x0112, 1) == record["orientation"]
            assert ImageOps.exif_transpose(image).size == (record["width"], record["height"])
            quarter_turn = record["orientation"] in (6, 8)
            assert (image.size != (record["width"], record["height"])) == (
                quarter_turn and record["width"] != record["height"]
            )
    assert {6, 8, 3} <= {record["orientation"] for record in truth}


def test_defects_stand_out_where_truth_boxes_say_in_the_displayed_frame(
    semicolon_demo: tuple[Path, DemoSummary],
) -> None:
    out, _ = semicolon_demo
    for record in read_truth(out):
        if not record["boxes"]:
            continue
        grey = displayed_grey(out / record["path"])
        for box in record["boxes"]:
            assert local_contrast(grey, box["xyxy"]) > 1.25, (record["path"], box)


def test_plain_powder_bed_does_not_stand_out(semicolon_demo: tuple[Path, DemoSummary]) -> None:
    out, _ = semicolon_demo
    normal = [record for record in read_truth(out) if record["label"] == "normal"]
    for record in normal:
        grey = displayed_grey(out / record["path"])
        height, width = grey.shape
        centre_box = [width // 2 - 40, height // 2 - 30, width // 2 + 40, height // 2 + 30]
        assert local_contrast(grey, centre_box) < 1.2


def test_semicolon_labels_are_messy_but_match_truth(
    semicolon_demo: tuple[Path, DemoSummary],
) -> None:
    out, _ = semicolon_demo
    encodings: Counter[str] = Counter()
    raw_texts = []
    for record in read_truth(out):
        if record["label"] != "abnormal":
            continue
        data = (out / record["path"]).with_suffix(".txt").read_bytes()
        text, encoding = decode_label(data)
        encodings[encoding] += 1
        raw_texts.append(data)
        filenames, boxes = parse_semicolon(text)
        assert filenames == {Path(record["path"]).name}
        assert Counter(boxes) == Counter(truth_boxes(record))

    dataset = "\n".join(decode_label(data)[0] for data in raw_texts)
    assert ";" in dataset and FULLWIDTH_SEMICOLON in dataset
    assert set(encodings) == {"gbk", "utf-8-sig", "utf-8"}
    assert any(b"\r\n" in data for data in raw_texts)
    assert any(b"\r\n" not in data and b"\n" in data for data in raw_texts)


def test_yolo_format_writes_normalised_boxes_and_class_list(tmp_path: Path) -> None:
    generate_demo(tmp_path, seed=1, n_abnormal=6, n_normal=2, label_format="yolo")
    class_order = sorted(DEFECT_CLASSES)

    classes = (tmp_path / "abnormal_root" / "classes.txt").read_text("utf-8").splitlines()
    assert classes == [DEFECT_CLASSES[cls] for cls in class_order]
    assert not (tmp_path / "abnormal_root" / "labelstudio_export.json").exists()
    for record in read_truth(tmp_path):
        label = (tmp_path / record["path"]).with_suffix(".txt")
        if record["label"] == "normal":
            assert not label.exists()
            continue
        width, height = record["width"], record["height"]
        recovered = []
        for line in label.read_text("utf-8").splitlines():
            index, cx, cy, w, h = line.split()
            assert all(re.fullmatch(r"\d\.\d{6}", v) for v in (cx, cy, w, h))
            cx, cy, w, h = (
                float(cx) * width,
                float(cy) * height,
                float(w) * width,
                float(h) * height,
            )
            xyxy = (round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2))
            recovered.append((class_order[int(index)], xyxy))
        assert Counter(recovered) == Counter(truth_boxes(record))


def test_labelstudio_format_writes_one_export_with_percent_boxes(tmp_path: Path) -> None:
    generate_demo(tmp_path, seed=1, n_abnormal=6, n_normal=2, label_format="labelstudio")
    truth = {record["path"]: record for record in read_truth(tmp_path)}

    assert not list(tmp_path.rglob("*.txt"))
    export = tmp_path / "abnormal_root" / "labelstudio_export.json"
    text = export.read_text("utf-8")
    tasks = json.loads(text)
    assert "\\u" not in text  # Chinese labels are written as-is, not escaped
    assert len(tasks) == 6
    for task in tasks:
        path = task["data"]["image"].removeprefix("/data/local-files/?d=")
        record = truth[path]
        assert record["label"] == "abnormal"
        recovered = []
        for result in task["annotations"][0]["result"]:
            assert result["original_width"] == record["width"]
            assert result["original_height"] == record["height"]
            v = result["value"]
            x1 = round(v["x"] / 100 * record["width"])
            y1 = round(v["y"] / 100 * record["height"])
            x2 = round((v["x"] + v["width"]) / 100 * record["width"])
            y2 = round((v["y"] + v["height"]) / 100 * record["height"])
            recovered.append((RAW_TO_CLASS[v["rectanglelabels"][0]], (x1, y1, x2, y2)))
        assert Counter(recovered) == Counter(truth_boxes(record))


@pytest.mark.parametrize(
    "kwargs",
    [{"label_format": "csv"}, {"n_abnormal": -1}, {"workers": 0}, {"seed": -1}],
)
def test_invalid_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_demo(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_regenerating_into_a_previous_demo_leaves_no_stale_files(tmp_path: Path) -> None:
    generate_demo(tmp_path, n_abnormal=5, n_normal=3, label_format="yolo")
    generate_demo(tmp_path, n_abnormal=2, n_normal=1)
    images = sorted(p.name for p in tmp_path.rglob("*.jpg"))
    assert len(images) == 3
    assert not list(tmp_path.rglob("classes.txt"))


def test_a_folder_with_other_image_roots_is_refused(tmp_path: Path) -> None:
    (tmp_path / "abnormal_root").mkdir()
    (tmp_path / "abnormal_root" / "factory.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a demo dataset"):
        generate_demo(tmp_path, n_abnormal=1, n_normal=1)
    assert (tmp_path / "abnormal_root" / "factory.jpg").exists()


def test_default_demo_gives_val_and_test_several_groups_of_at_least_40_images(tmp_path: Path) -> None:
    """The default layout under the demo's split parameters (params.yaml): folders are the groups."""
    records = []
    for kind in (ABNORMAL, NORMAL):
        for index in range(DEFAULT_COUNT):
            job = ItemJob(tmp_path, 0, kind, index, "semicolon")
            record = {"id": job.relative_image_path, "label": kind.label, "boxes": [], "group": job.batch}
            records.append({**record, "path": job.relative_image_path, "blake3": job.relative_image_path})
    result = split_manifest(records, load_params(Path(__file__).parents[2] / "params.yaml").split)
    for name in ("val", "test"):
        rows = result.splits[name]
        assert len(rows) >= 40, (name, len(rows))
        assert len({row["split_group"] for row in rows}) >= 4, name
        assert {row["label"] for row in rows} == {"abnormal", "normal"}
