"""Each step's CLI on missing or wrong input, a bad setting, an unreachable server, a full disk or a
permission error: exit code 1 (2 for parameters) and a message naming the file or setting, no traceback."""

import errno
import io
import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest

import defectvlm.io
from tests.conftest import read_json, run_cli, write_params
from tests.train.conftest import train_overrides


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("split", "manifest.jsonl: cannot read"),
        ("regions", "train.jsonl: cannot read"),
        ("build-sft", "train.jsonl: cannot read"),
        ("train", "train.jsonl: cannot read"),
        ("evaluate", "sft_summary.json not found"),
        ("register", "phase.json not found"),
    ],
)
def test_missing_inputs_are_clear_errors(tmp_path, capsys, step, message):
    params = write_params(tmp_path / "params.yaml", {"train": {"output_dir": str(tmp_path / "runs")}})
    extra = ["--phase", "1", "--no-tracking"] if step == "train" else []
    code = run_cli(
        step,
        "--params",
        params,
        "--in",
        tmp_path / "nowhere",
        *extra,
        *(["--out", tmp_path / "out"] if step != "train" else []),
    )
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_phase_2_without_phase_1_says_what_to_train_first(tmp_path, capsys, sft_dir):
    params = write_params(tmp_path / "params.yaml", {"train": {"output_dir": str(tmp_path / "runs")}})
    assert run_cli("train", "--phase", "2", "--params", params, "--in", sft_dir, "--no-tracking") == 1
    assert "train it first" in capsys.readouterr().err


def test_bad_parameter_is_exit_2_with_file_and_key(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"regions": {"neg_max_iou": 3}})
    assert run_cli("regions", "--params", params) == 2
    err = capsys.readouterr().err
    assert "params.yaml" in err and "regions.neg_max_iou" in err


def test_promote_and_reproduce_name_what_the_registry_lacks(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    assert run_cli("promote", "--params", params) == 1
    assert "no version @candidate" in capsys.readouterr().err
    assert run_cli("reproduce", "--params", params, "--run-id", "0123456789abcdef") == 1
    err = capsys.readouterr().err
    assert "run 0123456789abcdef not found" in err and "Traceback" not in err


# --- every user-caused failure: one paragraph naming the file or setting, exit 1/2, no traceback ---


def _fails_cleanly(capsys, code: int, expected_code: int, *named: str) -> str:
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err
    for text in named:
        assert text in " ".join(err.split()), err  # rich wraps long lines
    return err


@pytest.mark.parametrize("setting", ["templates", "knowledge"])
def test_a_missing_templates_or_knowledge_file_names_the_setting(tmp_path, capsys, sft_dir, setting):
    missing = tmp_path / "nowhere" / f"{setting}.yaml"
    code = run_cli(
        "build-sft", "--in", sft_dir.parent / "03", "--out", tmp_path / "out", "-S", f"sft.{setting}={missing}"
    )
    _fails_cleanly(capsys, code, 1, str(missing), f"sft.{setting}", "cannot read")


@pytest.mark.parametrize("setting", ["templates", "knowledge"])
def test_a_malformed_templates_or_knowledge_file_names_the_file_and_line(tmp_path, capsys, sft_dir, setting):
    broken = tmp_path / f"{setting}.yaml"
    broken.write_text("hint: fine\nregion_line: [unclosed\n", encoding="utf-8")
    code = run_cli(
        "build-sft", "--in", sft_dir.parent / "03", "--out", tmp_path / "out", "-S", f"sft.{setting}={broken}"
    )
    _fails_cleanly(capsys, code, 1, f"{broken}", f"sft.{setting}", "not valid YAML")


def test_malformed_params_yaml_is_a_parameter_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  ratios: {train: 0.8\n", encoding="utf-8")
    _fails_cleanly(capsys, run_cli("split", "--params", params), 2, str(params), "not valid YAML")


def test_malformed_label_files_are_rejected_by_name_not_crashed_on(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 4, "--n-normal", 2, "--label-format", "labelstudio") == 0
    (export,) = raw.rglob("labelstudio_export.json")
    export.write_text('[{"data": {"image": "a.jpg"}', encoding="utf-8")
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    run_cli("ingest", "--params", params, "--out", tmp_path / "out", "--quiet")
    assert "Traceback" not in capsys.readouterr().err
    report = read_json(tmp_path / "out" / "ingest_report.json")
    (entry,) = [f for f in report["files"] if f["path"].endswith("labelstudio_export.json")]
    assert entry["status"] == "rejected" and "bad_json" in entry["reasons"]


def test_a_malformed_yolo_data_yaml_rejects_its_labels_by_name(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 4, "--n-normal", 2, "--label-format", "yolo") == 0
    for names in raw.rglob("classes.txt"):
        names.unlink()
        (names.parent / "data.yaml").write_text("names: [scratch, dent\n", encoding="utf-8")
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    run_cli("ingest", "--params", params, "--out", tmp_path / "out", "--quiet")
    assert "Traceback" not in capsys.readouterr().err
    report = read_json(tmp_path / "out" / "ingest_report.json")
    rejected = [f for f in report["files"] if f["path"].endswith("data.yaml")]
    assert rejected and all(f["status"] == "rejected" and "no_class_names" in f["reasons"] for f in rejected)


def _train_with_deepspeed(tmp_path, sft_dir, config_text: str) -> int:
    config = tmp_path / "ds.json"
    config.write_text(config_text, encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", train_overrides(tmp_path, deepspeed=str(config)))
    return run_cli("train", "--phase", 1, "--params", params, "--in", sft_dir, "--no-tracking"), config


def test_a_malformed_deepspeed_config_names_the_file_and_line(tmp_path, capsys, sft_dir):
    code, config = _train_with_deepspeed(tmp_path, sft_dir, '{"zero_optimization": {"stage": 2,}}')
    _fails_cleanly(capsys, code, 1, str(config), "train.deepspeed", "not valid JSON")


def test_a_deepspeed_config_deepspeed_rejects_is_named_before_training(tmp_path, capsys, sft_dir):
    code, config = _train_with_deepspeed(tmp_path, sft_dir, '{"zero_optimization": {"stage": 7}}')
    _fails_cleanly(capsys, code, 1, str(config), "train.deepspeed", "not a valid DeepSpeed config", "stage")


def test_an_unreachable_mlflow_server_is_named_at_once(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    code = run_cli("promote", "--params", write_params(tmp_path / "params.yaml", {}), "-S", f"tracking.uri={uri}")
    _fails_cleanly(capsys, code, 1, f"cannot reach the MLflow tracking server at {uri}", "tracking.uri")
    assert time.monotonic() - started < 30  # not minutes of HTTP retries


class _NoWrites:
    """tempfile for defectvlm.io whose mkstemp fails as the OS would for `error`."""

    def __init__(self, error: int):
        self.error = error

    def mkstemp(self, dir, prefix, suffix):
        raise OSError(self.error, os.strerror(self.error), str(dir))


def test_a_permission_error_names_the_folder_and_the_fix(tmp_path, capsys, sft_dir, monkeypatch):
    monkeypatch.setattr(defectvlm.io, "tempfile", _NoWrites(errno.EACCES))
    code = run_cli("split", "--in", sft_dir.parent / "01", "--out", tmp_path / "locked")
    _fails_cleanly(capsys, code, 1, str(tmp_path / "locked"), "permission denied", "choose another path")


class _FullDisk:
    """os for defectvlm.io: every file it opens for writing fails with ENOSPC, as on a full disk."""

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode):
        os.close(fd)
        handle = io.BytesIO()

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle


def test_a_full_disk_names_the_file_and_leaves_no_partial_output(tmp_path, capsys, sft_dir, monkeypatch):
    monkeypatch.setattr(defectvlm.io, "os", _FullDisk())
    code = run_cli("split", "--in", sft_dir.parent / "01", "--out", tmp_path / "out")
    _fails_cleanly(capsys, code, 1, "no space left on the device while writing", str(tmp_path / "out"))
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("split: [\n", encoding="utf-8")
    assert run_cli("split", "--params", params, "--debug") == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("DEFECTVLM_DEBUG", "1")
    assert run_cli("split", "--params", params) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_phase_that_crashes_is_recorded_failed_in_mlflow(tmp_path, capsys, sft_dir, monkeypatch):
    """Full disk while training writes its outputs: the phase's MLflow run ends FAILED, not FINISHED."""
    params = write_params(tmp_path / "params.yaml", train_overrides(tmp_path, phase1={"max_steps": 1}))
    monkeypatch.setattr(defectvlm.io, "os", _FullDisk())
    code = run_cli("train", "--phase", 1, "--params", params, "--in", sft_dir)
    _fails_cleanly(capsys, code, 1, "no space left on the device while writing", str(tmp_path / "runs"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    (phase_run,) = client.search_runs([experiment.experiment_id], "tags.`defectvlm.step` = 'train_phase1'")
    assert phase_run.info.status == "FAILED"
    assert mlflow.active_run() is None


def test_the_real_cli_process_exits_cleanly_with_the_message(tmp_path):
    """The installed entry point, not just main(): no traceback on stderr, exit 2."""
    params = tmp_path / "params.yaml"
    params.write_text("split: [\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "defectvlm", "split", "--params", str(params)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "Traceback" not in done.stderr
