"""Every file of the malformed corpus appears once in the report with the expected status."""

import json
from pathlib import Path

import pytest

from defectvlm.io import read_jsonl
from tests.conftest import REPO, read_json, run_cli, write_params
from tests.fixtures.corpus import CORPUS_PARAMS, EXPECTED, write_corpus

# The docs page that lists ingest's reason codes (docs/data-and-labels.md, "What ingest checks").
DATA_AND_LABELS_PAGE = REPO / "docs" / "data-and-labels.md"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    overrides = json.loads(json.dumps(CORPUS_PARAMS))
    overrides["data"] = {"abnormal_root": str(root / "abnormal_root"), "normal_root": str(root / "normal_root")}
    params = write_params(root / "params.yaml", overrides)
    code = run_cli("ingest", "--params", params, "--out", root / "out", "--quiet")
    return root, code


def test_corpus_has_at_least_30_malformed_cases():
    malformed = [p for p, (status, reason) in EXPECTED.items() if status != "accepted" or reason]
    assert len(malformed) >= 30


def test_every_file_once_with_expected_status_and_reason(ingested):
    root, _ = ingested
    report = read_json(root / "out" / "ingest_report.json")
    seen = [str(Path(f["path"]).relative_to(root)) for f in report["files"]]
    on_disk = sorted(str(p.relative_to(root)) for p in (root / "abnormal_root").rglob("*") if p.is_file()) + sorted(
        str(p.relative_to(root)) for p in (root / "normal_root").rglob("*") if p.is_file()
    )
    assert sorted(seen) == sorted(on_disk) and len(seen) == len(set(seen))
    assert set(seen) == set(EXPECTED)
    wrong = {}
    for entry in report["files"]:
        rel = str(Path(entry["path"]).relative_to(root))
        status, reason = EXPECTED[rel]
        if entry["status"] != status or (reason and reason not in entry["reasons"]):
            wrong[rel] = (entry["status"], entry["reasons"], "expected", status, reason)
    assert not wrong, wrong


def test_counts_add_up_and_manifest_holds_exactly_the_usable_images(ingested):
    root, _ = ingested
    report = read_json(root / "out" / "ingest_report.json")
    counts = report["counts"]
    assert counts["accepted"] + counts["repaired"] + counts["rejected"] == counts["total"] == len(EXPECTED)
    manifest = read_jsonl(root / "out" / "manifest.jsonl")
    usable = {f["path"] for f in report["files"] if f["kind"] == "image" and f["status"] != "rejected"}
    assert {r["path"] for r in manifest} == usable
    assert report["images"]["in_manifest"] == len(manifest)


def test_rejected_label_lines_are_named_in_messages(ingested):
    root, _ = ingested
    report = read_json(root / "out" / "ingest_report.json")
    by_rel = {str(Path(f["path"]).relative_to(root)): f for f in report["files"]}
    assert any(
        m.endswith("not4.txt:1: 3 numbers in the coordinate field (4 per box)")
        for m in by_rel["abnormal_root/bad/not4.txt"]["messages"]
    )
    assert any("line 1" in m and "裂纹" in m for m in by_rel["abnormal_root/bad/unknown.jpg"]["messages"])


def test_boxes_land_in_the_displayed_frame(ingested):
    root, _ = ingested
    manifest = {r["id"]: r for r in read_jsonl(root / "out" / "manifest.jsonl")}
    multibox = manifest["abnormal/ok/multibox.jpg"]
    assert [b["xyxy"] for b in multibox["boxes"]] == [[5, 6, 30, 40], [50, 20, 80, 60]]
    assert {b["cls"] for b in multibox["boxes"]} == {"over_melt"}
    rotated = manifest["abnormal/ok/rotated.jpg"]
    assert (rotated["width"], rotated["height"], rotated["orientation"]) == (64, 96, 6)
    clip = manifest["abnormal/repair/clip.jpg"]
    assert clip["boxes"][0]["xyxy"] == [0, 10, 96, 50]
    assert len(manifest["abnormal/repair/small.jpg"]["boxes"]) == 1
    yolo = manifest["abnormal/yolo/y_ok.jpg"]
    assert yolo["boxes"][0] == {"xyxy": [36.0, 24.0, 60.0, 40.0], "cls": "slag", "raw": "灰渣"}
    ls = manifest["abnormal/ls/ls_ok.jpg"]
    assert ls["boxes"][0]["xyxy"] == pytest.approx([9.6, 6.4, 57.6, 38.4])
    assert manifest["normal/b1/n_ok.jpg"]["boxes"] == [] and manifest["normal/b1/n_ok.jpg"]["group"] == "b1"


def test_stray_delimiters_give_the_same_boxes_as_a_clean_line(ingested):
    root, _ = ingested
    manifest = {r["id"]: r for r in read_jsonl(root / "out" / "manifest.jsonl")}
    expected = {"stray_lead": "灰渣", "stray_trail": "灰渣", "stray_double": "条纹", "stray_blank": "过熔"}
    for name, raw in expected.items():
        (box,) = manifest[f"abnormal/ok/{name}.jpg"]["boxes"]
        assert box["xyxy"] == [10, 10, 50, 50] and box["raw"] == raw


def test_layouts_of_other_tools_give_their_boxes(ingested):
    root, _ = ingested
    manifest = {r["id"]: r for r in read_jsonl(root / "out" / "manifest.jsonl")}
    ultralytics = manifest["abnormal/ultra/images/train/u1.jpg"]
    assert ultralytics["boxes"] == [{"xyxy": [36.0, 24.0, 60.0, 40.0], "cls": "streak", "raw": "条纹"}]
    for background in ("abnormal/ultra/images/train/u_bg.jpg", "abnormal/ultra/images/val/u_empty.jpg"):
        assert (manifest[background]["label"], manifest[background]["boxes"]) == ("normal", [])
    assert manifest["abnormal/lsyolo/images/y1.jpg"]["boxes"][0]["raw"] == "灰渣"  # classes.txt: 条纹, 灰渣
    assert manifest["abnormal/lsyolo/pre/prefixed.jpg"]["boxes"][0]["xyxy"] == [10, 10, 50, 50]
    (box,) = manifest["abnormal/lsmin/m1.jpg"]["boxes"]
    assert box["xyxy"] == pytest.approx([9.6, 6.4, 57.6, 38.4]) and box["raw"] == "条纹"


def test_prediction_only_tasks_say_so_and_can_be_accepted(ingested, tmp_path):
    root, _ = ingested
    report = read_json(root / "out" / "ingest_report.json")
    (entry,) = [f for f in report["files"] if f["path"].endswith("lspred/p1.jpg")]
    assert entry["reasons"] == ["predictions_only"]
    assert "no human annotation" in entry["messages"][0] and "labels.use_predictions: true" in entry["messages"][0]

    overrides = json.loads(json.dumps(CORPUS_PARAMS))
    overrides["data"] = {"abnormal_root": str(root / "abnormal_root"), "normal_root": str(root / "normal_root")}
    overrides["labels"]["use_predictions"] = True
    overrides["labels"]["background_images"] = "reject"
    run_cli("ingest", "--params", write_params(tmp_path / "p.yaml", overrides), "--out", tmp_path, "--quiet")
    statuses = {
        Path(f["path"]).name: (f["status"], f["reasons"]) for f in read_json(tmp_path / "ingest_report.json")["files"]
    }
    assert statuses["p1.jpg"] == ("accepted", ["labels_from_predictions"])
    assert statuses["u_bg.jpg"] == statuses["u_empty.jpg"] == ("rejected", ["background_image"])
    manifest = {r["id"]: r for r in read_jsonl(tmp_path / "manifest.jsonl")}
    assert manifest["abnormal/lspred/p1.jpg"]["boxes"][0]["xyxy"] == pytest.approx([9.6, 6.4, 48.0, 32.0])
    page = DATA_AND_LABELS_PAGE.read_text(encoding="utf-8")
    assert all(f"`{code}`" in page for code in ("labels_from_predictions", "background_image", "bad_task"))


def test_unknown_label_fails_the_run_with_a_message(ingested, capsys):
    _, code = ingested
    assert code == 1


def test_unknown_label_policies(tmp_path):
    write_corpus(tmp_path)
    results = {}
    for policy in ("other", "drop"):
        overrides = json.loads(json.dumps(CORPUS_PARAMS))
        overrides["data"] = {
            "abnormal_root": str(tmp_path / "abnormal_root"),
            "normal_root": str(tmp_path / "normal_root"),
        }
        overrides["labels"]["unknown_label"] = policy
        params = write_params(tmp_path / f"{policy}.yaml", overrides)
        assert run_cli("ingest", "--params", params, "--out", tmp_path / policy, "--quiet") == 0
        report = read_json(tmp_path / policy / "ingest_report.json")
        results[policy] = {Path(f["path"]).name: f for f in report["files"]}
    assert results["other"]["unknown.jpg"]["status"] == "repaired"
    assert "unknown_label_as_other" in results["other"]["unknown.jpg"]["reasons"]
    assert "unknown_label_dropped" in results["drop"]["unknown.jpg"]["reasons"]
    assert results["drop"]["unknown.jpg"]["status"] == "rejected"  # its only box was dropped


def test_too_many_rejects_exit_1_with_message_not_traceback(tmp_path, capsys):
    write_corpus(tmp_path)
    overrides = json.loads(json.dumps(CORPUS_PARAMS))
    overrides["data"] = {"abnormal_root": str(tmp_path / "abnormal_root"), "normal_root": str(tmp_path / "normal_root")}
    overrides["labels"]["unknown_label"] = "other"
    overrides["ingest"]["max_rejected_fraction"] = 0.1
    params = write_params(tmp_path / "params.yaml", overrides)
    assert run_cli("ingest", "--params", params, "--out", tmp_path / "out", "--quiet") == 1
    err = capsys.readouterr().err
    assert "max_rejected_fraction" in err and "Traceback" not in err
    assert (tmp_path / "out" / "ingest_report.json").exists()


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    params = write_params(
        tmp_path / "params.yaml", {"data": {"abnormal_root": str(tmp_path / "nope"), "normal_root": str(tmp_path)}}
    )
    assert run_cli("ingest", "--params", params, "--out", tmp_path / "out") == 1
    assert "does not exist" in capsys.readouterr().err


def test_every_reason_code_is_documented_in_the_docs(ingested):
    root, _ = ingested
    page = DATA_AND_LABELS_PAGE.read_text(encoding="utf-8")
    report = read_json(root / "out" / "ingest_report.json")
    undocumented = {code for code in report["reasons"] if f"`{code}`" not in page} - {"class_names_used"}
    assert not undocumented
