"""Each step's CLI on missing or wrong input: exit code 1 and a message naming the file, no traceback."""

import pytest

from tests.conftest import run_cli, write_params


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
