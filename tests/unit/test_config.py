import json
from pathlib import Path

import pytest

from defectvlm.config import (
    ConfigError,
    Params,
    PhaseParams,
    SftParams,
    field_docs,
    load_params,
    params_from_dict,
    params_to_dict,
)

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_every_field_is_documented():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.labels.label_map["灰渣"] == "slag"
    docs = field_docs()
    assert docs and all(doc for _, doc, _ in docs)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("ingest:\n  verify: header\n  min_box_sise: 3\n", 3, "ingest.min_box_sise"),
        ("ingest:\n  min_box_size: -2\n", 2, "ingest.min_box_size"),
        ("data:\n  abnormal_root: 5\n", 2, "data.abnormal_root"),
        ("labels:\n  format: csv\n", 2, "labels.format"),
        ("ingest:\n  max_rejected_fraction: 1.5\n", 2, "ingest.max_rejected_fraction"),
        ("ingest:\n  workers: true\n", 2, "ingest.workers"),
        ("trainer:\n  lr: 1\n", 1, "trainer"),
        ("train:\n  metric_for_best_model: eval_loss\n  greater_is_better: true\n", 3, "train.greater_is_better"),
        ("train:\n  metric_for_best_model: roi_f1\n  greater_is_better: false\n", 3, "train.greater_is_better"),
        # the full key of a phase, from a field rule, a section rule and an unknown key
        ("train:\n  seed: 1\n  phase2:\n    lr_lm: -1\n", 4, "train.phase2.lr_lm: must be >= 0, got -1"),
        ("train:\n  phase3:\n    epochs: 0\n    max_steps: 0\n", 3, "train.phase3.epochs: epochs or max_steps"),
        ("train:\n  phase2:\n    lr_llm: 1\n", 3, "train.phase2.lr_llm: unknown key (known: enabled, epochs,"),
        # pydantic's own type checks say what was expected and what came
        ("train:\n  phase2:\n    max_steps: 1.5\n", 3, "train.phase2.max_steps: expected int, got float 1.5"),
        ("serve:\n  port: '80'\n", 2, "serve.port: expected int, got str '80'"),
        ("ingest:\n  image_extensions:\n    - .jpg\n    - 5\n", 4, "ingest.image_extensions[1]: expected str"),
        ("train:\n  lora: [1]\n", 2, "train.lora: expected a mapping, got list"),
        ("detector:\n  backend: yolo\n", 2, "detector.backend: must be one of centernet, ultralytics; got 'yolo'"),
        # a rule broken by a default the file does not set is blamed on the nearest key the file has
        ("data:\n  normal_root: n\ntrain:\n  metric_for_best_model: eval_loss\n", 3, "train.greater_is_better"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, text, line, key):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {key}"), message


def test_the_best_checkpoint_direction_follows_the_metric():
    assert params_from_dict({"train": {"metric_for_best_model": "eval_loss", "greater_is_better": False}})
    assert params_from_dict({"train": {"metric_for_best_model": "roi_f1", "greater_is_better": True}})
    with pytest.raises(ConfigError, match="eval_loss is better when lower: set train.greater_is_better: false"):
        params_from_dict({"train": {"metric_for_best_model": "eval_loss"}})  # the default (true) would keep the worst


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ingest: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_the_committed_params_and_the_defaults_keep_their_dict_form():
    """params_to_dict is what runs log and hash: the same keys in the same order, floats as
    floats, as the dataclass configuration wrote it (tests/fixtures/params_dict.json, recorded
    before the move to pydantic). After changing params.yaml or a default on purpose, rewrite
    the fixture from params_to_dict(load_params("params.yaml")) and params_to_dict(params_from_dict({}))."""
    recorded = (REPO / "tests" / "fixtures" / "params_dict.json").read_text(encoding="utf-8")
    current = {
        "params.yaml": params_to_dict(load_params(REPO / "params.yaml")),
        "defaults": params_to_dict(params_from_dict({})),
    }
    assert json.dumps(current, ensure_ascii=False, indent=1) + "\n" == recorded


def test_params_round_trip_through_their_dict():
    params = load_params(REPO / "params.yaml")
    again = params_from_dict(params_to_dict(params))
    assert again == params and params_to_dict(again) == params_to_dict(params)
    assert list(params_to_dict(params)) == list(Params.model_fields)


def test_a_partly_given_phase_keeps_that_phase_s_defaults():
    train = params_from_dict({"train": {"phase2": {"lr_lm": 1e-3}, "phase3": None}}).train
    assert train.phase2.lr_lm == 1e-3 and train.phase2.vision_lora_top_n == 2  # phase2's default, not the class's
    assert train.phase3 == params_from_dict({}).train.phase3


def test_yaml_1_1_numbers_and_keys_are_read_as_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  phase1:\n    lr_lm: 1e-4\nlabels:\n  label_map:\n    0: crack\n", encoding="utf-8")
    params = load_params(path)
    assert params.train.phase1.lr_lm == 1e-4 and isinstance(params.train.phase1.lr_lm, float)
    assert params.labels.label_map == {"0": "crack"}


def test_model_copy_replaces_one_value_and_the_original_stays():
    params = params_from_dict({})
    moved = params.model_copy(update={"serve": params.serve.model_copy(update={"port": 9000})})
    assert moved.serve.port == 9000 and params.serve.port == 8000 and moved.train == params.train


def test_a_section_built_in_code_from_bad_values_is_a_parameter_error():
    from pydantic import ValidationError

    from defectvlm.errors import explain

    with pytest.raises(ValidationError) as info:
        SftParams(crop_size=30)  # as from an adapter's prompt.json
    assert explain(info.value, dict) == (
        2,
        "parameter error",
        "SftParams.crop_size: must be a positive multiple of 28, got 30",
    )
    with pytest.raises(ValidationError) as info:
        PhaseParams(max_steps="3")
    assert explain(info.value, dict)[2] == "PhaseParams.max_steps: expected int, got str '3'"


def test_ints_widen_to_float_and_sections_are_frozen():
    params = params_from_dict({"ingest": {"min_box_size": 3}})
    assert params.ingest.min_box_size == 3.0 and isinstance(params.ingest.min_box_size, float)
    with pytest.raises(AttributeError):
        params.ingest.min_box_size = 5  # type: ignore[misc]


def test_label_map_canonical_lookup():
    labels = params_from_dict({"labels": {"label_map": {"灰渣": "slag"}}}).labels
    assert labels.canonical("灰渣") == "slag"
    assert labels.canonical("slag") == "slag"
    assert labels.canonical("裂纹") is None
    assert params_from_dict({}).labels.canonical("裂纹") == "裂纹"


def test_atomic_writes_leave_no_temp_files_and_usual_permissions(tmp_path):
    from defectvlm.io import read_jsonl, write_jsonl_atomic

    write_jsonl_atomic(tmp_path / "a.jsonl", [{"k": "灰渣", "v": 1.5}, {"k": None}])
    assert read_jsonl(tmp_path / "a.jsonl") == [{"k": "灰渣", "v": 1.5}, {"k": None}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o044  # group/others may read
