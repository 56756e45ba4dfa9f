"""demo-data -> ingest -> split -> regions -> build-sft through the CLI, twice, byte for byte."""

import json

import pytest

from defectvlm.io import read_jsonl
from tests.conftest import read_json, run_cli, write_params

pytestmark = pytest.mark.slow
STEPS_OUT = ("01_ingested", "02_split", "03_regions", "04_sft")


def prepare(tmp_path, raw, run: str, fmt: str = "native") -> dict[str, bytes]:
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    out = tmp_path / run
    assert run_cli("ingest", "--params", params, "--out", out / "01_ingested", "--quiet") == 0
    assert run_cli("split", "--params", params, "--in", out / "01_ingested", "--out", out / "02_split") == 0
    assert run_cli("regions", "--params", params, "--in", out / "02_split", "--out", out / "03_regions") == 0
    encoding = [] if fmt == "native" else ["-S", "sft.region_encoding=coords"]  # exports carry no crops
    assert (
        run_cli(
            "build-sft",
            "--params",
            params,
            "--in",
            out / "03_regions",
            "--out",
            out / "04_sft",
            "--format",
            fmt,
            *encoding,
        )
        == 0
    )
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 36, "--n-normal", 36) == 0
    return raw


def test_preparation_is_complete_leak_free_and_byte_identical(tmp_path, raw):
    first = prepare(tmp_path, raw, "a")
    second = prepare(tmp_path, raw, "b")
    assert first == second
    assert {name.split("/")[0] for name in first} == set(STEPS_OUT)

    out = tmp_path / "a"
    report = read_json(out / "02_split" / "split_report.json")
    assert report["leakage"] == {"groups_in_several_splits": 0, "hashes_in_several_splits": 0}
    assert report["images"] == 72 == sum(c["images"] for c in report["counts"].values())
    assert all(c["abnormal"] and c["normal"] for c in report["counts"].values())

    for split in ("train", "val", "test"):
        images = read_jsonl(out / "03_regions" / f"{split}.jsonl")
        samples = read_jsonl(out / "04_sft" / f"{split}.jsonl")
        assert {s["image_id"] for s in samples} == {i["id"] for i in images}
        for img in images:
            assert all(
                0 <= v <= limit for r in img["regions"] for v, limit in zip(r["box"], img["frame"] * 2, strict=True)
            )
            assert img["label"] == "normal" or any(r["source"] == "positive" for r in img["regions"])


@pytest.mark.parametrize("fmt", ["swift", "llamafactory"])
def test_export_formats_write_their_files(tmp_path, raw, fmt):
    files = prepare(tmp_path, raw, fmt, fmt)
    first = json.loads(files[f"04_sft/{fmt}/train.jsonl"].decode().splitlines()[0])
    assert first["images"][0].startswith("images/") and "<image>" in first["messages"][-2]["content"]
    assert f"04_sft/{fmt}/{first['images'][0]}" in files
    assert (f"04_sft/{fmt}/dataset_info.json" in files) == (fmt == "llamafactory")
    assert isinstance(json.loads(files["04_sft/train.jsonl"].decode().splitlines()[0])["messages"][1]["content"], list)
