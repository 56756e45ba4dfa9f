from pathlib import Path

import pytest

from defectvlm.config import ConfigError, Params, field_docs, load_params, params_from_dict


def test_repo_params_load_and_every_field_is_documented():
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
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
