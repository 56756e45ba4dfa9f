"""Every step's time is printed and recorded for the demo's table; the calibration figure that
makes times from two machines comparable."""

from __future__ import annotations

import json

from defectvlm.calibration import calibrate, describe, read_stage_times
from defectvlm.data.demo import generate_demo
from tests.conftest import run_cli, write_params


def test_a_step_records_its_time_where_the_variable_points_and_the_table_lists_it(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    generate_demo(raw, n_abnormal=2, n_normal=2)
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    times = tmp_path / "reports" / "stage_times.jsonl"
    assert run_cli("scan-labels", "--params", params, "--out", tmp_path / "stats.json") == 0  # not recorded
    assert not times.exists()
    monkeypatch.setenv("DEFECTVLM_STAGE_TIMES", str(times))
    for _ in range(2):
        assert run_cli("scan-labels", "--params", params, "--out", tmp_path / "stats.json") == 0
    rows = read_stage_times(times)
    assert [step for step, _, _ in rows] == ["scan-labels", "scan-labels"]
    assert all(0 <= seconds <= with_start_up for _, seconds, with_start_up in rows)
    assert "scan-labels:" in capsys.readouterr().err  # printed by the step itself

    assert run_cli("stage-times", "--file", times) == 0
    table = capsys.readouterr().err
    assert "scan-labels" in table and "total" in table and "calibration" in table


def test_a_failed_step_records_no_time(tmp_path, monkeypatch):
    times = tmp_path / "stage_times.jsonl"
    monkeypatch.setenv("DEFECTVLM_STAGE_TIMES", str(times))
    params = write_params(tmp_path / "params.yaml", {"data": {"abnormal_root": str(tmp_path / "missing")}})
    assert run_cli("scan-labels", "--params", params, "--out", tmp_path / "stats.json") != 0
    assert read_stage_times(times) == []


def test_stage_times_without_a_file_says_so(tmp_path, capsys):
    assert run_cli("stage-times", "--file", tmp_path / "none.jsonl") == 0
    assert "no stage times" in capsys.readouterr().err


def test_calibration_times_the_fixed_work_and_names_the_machine() -> None:
    figures = calibrate()
    assert figures["matmul_s"] > 0 and figures["jpeg_decode_s"] > 0
    assert figures["total_s"] == round(figures["matmul_s"] + figures["jpeg_decode_s"], 3)
    assert figures["cpu_model"] and figures["threads"] == 2
    assert json.loads(json.dumps(figures)) == figures
    assert figures["cpu_model"] in describe(figures) and str(figures["total_s"]) in describe(figures)
