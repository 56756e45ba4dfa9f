"""demo-data -> scan-labels -> ingest through the CLI, for each label format."""

import json

import pytest

from defectvlm.io import read_jsonl
from tests.conftest import read_json, run_cli, write_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("label_format", ["semicolon", "yolo", "labelstudio"])
def test_demo_scan_ingest_accounts_for_every_file(tmp_path, label_format, capsys):
    raw = tmp_path / "raw"
    assert (
        run_cli(
            "demo-data", "--out", raw, "--n-abnormal", 12, "--n-normal", 8, "--seed", 3, "--label-format", label_format
        )
        == 0
    )
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )

    assert run_cli("scan-labels", "--params", params, "--out", tmp_path / "label_stats.json") == 0
    stats = read_json(tmp_path / "label_stats.json")
    truth = [json.loads(line) for line in (raw / "demo_truth.jsonl").read_text(encoding="utf-8").splitlines()]
    n_truth_boxes = sum(len(t["boxes"]) for t in truth)
    assert sum(v["boxes"] for v in stats["raw_labels"].values()) == n_truth_boxes
    assert all(v["maps_to"] is not None for v in stats["raw_labels"].values())
    assert "label_map:" in capsys.readouterr().out

    assert run_cli("ingest", "--params", params, "--out", tmp_path / "ingested", "--quiet") == 0
    report = read_json(tmp_path / "ingested" / "ingest_report.json")
    on_disk = [p for root in ("abnormal_root", "normal_root") for p in (raw / root).rglob("*") if p.is_file()]
    counts = report["counts"]
    assert counts["total"] == len(on_disk) == len(report["files"])
    assert counts["accepted"] + counts["repaired"] + counts["rejected"] == len(on_disk)
    assert counts["rejected"] == 0, [f for f in report["files"] if f["status"] == "rejected"]

    manifest = {r["path"].removeprefix(str(raw) + "/"): r for r in read_jsonl(tmp_path / "ingested" / "manifest.jsonl")}
    assert len(manifest) == len(truth) == 20
    for item in truth:
        record = manifest[item["path"]]
        assert (record["width"], record["height"]) == (item["width"], item["height"])
        assert record["label"] == item["label"]
        got = sorted((b["cls"], b["xyxy"]) for b in record["boxes"])
        want = sorted((b["cls"], [float(v) for v in b["xyxy"]]) for b in item["boxes"])
        assert [c for c, _ in got] == [c for c, _ in want]
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=0.02)


def test_ingest_output_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    raw = tmp_path / "raw"
    run_cli("demo-data", "--out", raw, "--n-abnormal", 40, "--n-normal", 40)
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert run_cli("ingest", "--params", params, "-S", f"ingest.workers={workers}", "--out", out, "--quiet") == 0
        outputs.append({name: (out / name).read_bytes() for name in ("manifest.jsonl", "ingest_report.json")})
    assert outputs[0] == outputs[1]
