"""Each DVC stage lists exactly what its step reads.

Three links, each checked: (1) running every stage's command on tiny data while recording the
params keys and source files it reads (tests/pipeline/recorder.py) gives the step table
`STEPS` (params, code); (2) dvc.yaml's params and source deps are the ones generated from the
table; (3) with real `dvc status`, changing any params key or any file under src/ reports a
change in exactly the stages that read it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defectvlm.cli import build_parser
from defectvlm.config import field_docs, load_params, params_to_dict
from defectvlm.data.demo import generate_demo
from defectvlm.dvc_stages import declared_paths, dvc_yaml
from defectvlm.step_types import derived, dest
from defectvlm.steps import STEPS
from tests.conftest import REPO, write_params
from tests.pipeline.recorder import recording

DVC_TEXT = (REPO / "dvc.yaml").read_text(encoding="utf-8")
DVC = yaml.safe_load(DVC_TEXT)["stages"]
KEYS = [key for key, _, _ in field_docs()]
STAGES = derived(STEPS, "dvc")  # the steps with a DVC stage (deploy is the cluster's only)
SOURCES = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts
)

# Read only under settings the recorded run does not use.
CONDITIONAL = {
    # a raw label missing from label_map; an Ultralytics tree's background image; a prediction-only task
    "ingest": {"labels.unknown_label", "labels.background_images", "labels.use_predictions"},
    "split": {"split.group_depth", "split.group_regex"},  # group_by: parent_depth / regex
    # decoy_count: fixed (the recorded run: negatives_from both, its fold detectors on detector.steps)
    # misplaced_per_pos 0: the misplaced boxes' IoU limit is never needed
    "regions": {"regions.normal_decoys_per_image", "regions.misplaced_max_iou"},
    "sft": {  # language: en; format: swift | llamafactory | yolo
        "src/defectvlm/data/templates/en.yaml",
        "src/defectvlm/data/exports.py",
        "src/defectvlm/data/images.py",
        "src/defectvlm/data/yolo_export.py",
        "src/defectvlm/models/families.py",
        "model.family",
        "model.name_or_path",
        "model.min_pixels",
        "model.max_pixels",
    },
    "train_phase3": {"train.phase1.enabled"},  # phase 2 disabled: phase 3 starts from phase 1
    # the recorded run's two-step detector proposes no region above its confidence: nothing is scored
    "predict": {
        *("src/defectvlm/data/sft.py", "src/defectvlm/evaluate/scoring.py", "src/defectvlm/seeding.py"),
        "src/defectvlm/evaluate/shared_prefix.py",
        "src/defectvlm/train/data.py",
    },
    # the same detector: the cascade has no proposal to judge (the VLM is never asked)
    "evaluate_cascade": {
        *("src/defectvlm/data/sft.py", "src/defectvlm/evaluate/scoring.py", "src/defectvlm/seeding.py"),
        "src/defectvlm/evaluate/shared_prefix.py",
        "src/defectvlm/train/data.py",
    },
    # the recorded run's two-step detector predicts no box, so its box metrics never match one (iou)
    # backend: ultralytics (the optional extra) trains a YOLO on the split written as its dataset
    "train_detector": {
        "src/defectvlm/data/boxes.py",
        "detector.ultralytics_model",
        "src/defectvlm/detector/ultralytics_backend.py",
        "src/defectvlm/data/yolo_export.py",
    },
}
# a model.family other than qwen2_5_vl builds its tiny model there
for _step in ("train_phase1", "train_phase2", "train_phase3", "evaluate", "evaluate_cascade", "predict", "export"):
    CONDITIONAL.setdefault(_step, set()).add("src/defectvlm/models/tiny_families.py")
RECORD_STEPS = {"register", "train_detector"}  # their output is an MLflow record: the tracking code is part of the step


def covers(declared, item: str) -> bool:
    return any(item == d or item.startswith(d + ".") or item.startswith(d + "/") for d in declared)


# model.name_or_path: tiny-random builds its tokenizer from the templates (`tiny` brings the one it
# was pretrained with); training reads zh.yaml and knowledge.yaml for the prompt, en.yaml for sft.language: en
TEMPLATES = [path for path in SOURCES if path.startswith("src/defectvlm/data/templates/")]
for _name, _step in STEPS.items():
    if _name != "sft" and covers(_step.code, TEMPLATES[0]):
        training = _name.startswith("train_phase")
        CONDITIONAL.setdefault(_name, set()).update(p for p in TEMPLATES if not training or p.endswith("/en.yaml"))


def _dvc(args: list[str], cwd: Path) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_yaml_is_generated_from_the_step_table():
    assert dvc_yaml() == DVC_TEXT, "dvc.yaml is stale: run `defectvlm pipeline dvc` and commit it"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every stage's command run in order on the small demo data, with what each read."""
    root = tmp_path_factory.mktemp("reads")
    shutil.copytree(REPO / "configs", root / "configs")
    generate_demo(root / "data" / "raw", n_abnormal=12, n_normal=8)
    fast = {"batch_size": 2, "eval_steps": 2, "save_steps": 2, "save_total_limit": 1}  # two evaluations, a save
    fast.update({f"phase{n}": {"max_steps": 4} for n in (1, 2, 3)})
    detector = {"steps": 2, "input_size": 64, "crop_size": 32, "width": 4, "threads": 1}
    overrides = {"train": fast, "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}, "detector": detector}
    overrides["regions"] = {"negatives_from": "both", "negatives_folds": 2}  # the out-of-fold detectors' reads
    overrides["registry"] = {"require_export_parity": True}  # deploy checks the export's parity tag
    write_params(root / "params.yaml", overrides)
    values = params_to_dict(load_params(root / "params.yaml"))
    reads = {}
    previous = Path.cwd()
    os.chdir(root)
    try:
        for name, stage in DVC.items():
            args = build_parser().parse_args(shlex.split(_interpolate(stage["cmd"], values))[1:])
            with recording(records=name in RECORD_STEPS) as reads[name]:
                assert args.func(args) == 0, name
        for name, step in STEPS.items():  # a cluster-only step: its function on the declared paths
            if name not in DVC:
                options = {dest(o): step.fixed.get(dest(o), o.default) for o in step.options if not o.sets}
                paths = {key: _interpolate(str(path), values) for key, path in declared_paths(step, STEPS).items()}
                with recording(records=name in RECORD_STEPS) as reads[name]:
                    assert step.function(load_params("params.yaml"), **options, **paths) == 0, name
    finally:
        os.chdir(previous)
    return reads


@pytest.mark.slow
def test_every_params_key_a_step_reads_is_in_its_table_entry_and_no_other(recorded):
    for name, step in STEPS.items():
        missing = {key for key in recorded[name].params if not covers(step.params, key)}
        assert not missing, f"{name} reads {sorted(missing)}, which its STEPS entry (and dvc.yaml) does not list"
        unread = {key for key in KEYS if covers(step.params, key)} - recorded[name].params
        assert unread <= CONDITIONAL.get(name, set()), f"{name} lists {sorted(unread)} but never reads them"


@pytest.mark.slow
def test_every_source_file_a_step_runs_is_in_its_code_deps_and_no_other(recorded):
    for name, step in STEPS.items():
        missing = {path for path in recorded[name].files if not covers(step.code, path)}
        assert not missing, f"{name} runs {sorted(missing)}, which its STEPS code (and dvc.yaml deps) does not list"
        unread = {path for path in SOURCES if covers(step.code, path) and not path.endswith("__init__.py")}
        unread -= recorded[name].files
        assert unread <= CONDITIONAL.get(name, set()), f"{name} lists {sorted(unread)} but never runs them"


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, "changed"]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return f"{value}-changed"


def _set(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _interpolate(text: str, values: dict) -> str:
    while "${" in text:
        start = text.index("${")
        end = text.index("}", start)
        text = text[:start] + str(_get(values, text[start + 2 : end])) + text[end + 1 :]
    return text


@pytest.fixture
def locked(tmp_path) -> Path:
    """A DVC repository with this dvc.yaml, params.yaml and src/, every stage's deps and outs
    present (placeholders) and recorded in dvc.lock: `dvc status` reports nothing."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    values = params_to_dict(load_params(REPO / "params.yaml"))  # every key present, defaults included
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    for stage in DVC.values():
        for entry in [
            *stage.get("deps", []),
            *stage.get("outs", []),
            *stage.get("metrics", []),
            *stage.get("plots", []),
        ]:
            path = tmp_path / _interpolate(next(iter(entry)) if isinstance(entry, dict) else entry, values)
            if not path.exists():
                folder = path if not path.suffix else path.parent
                folder.mkdir(parents=True, exist_ok=True)
                (path if path.suffix else path / "placeholder").write_text(str(path), encoding="utf-8")
    _dvc(["init", "--no-scm", "-q"], tmp_path)
    _dvc(["commit", "-f", "-q"], tmp_path)
    assert json.loads(_dvc(["status", "--json"], tmp_path)) == {}
    return tmp_path


def _reported(status: dict) -> dict[str, tuple[set[str], set[str]]]:
    """stage -> (params keys reported changed, changed dep paths)."""
    reported = {}
    for stage, entries in status.items():
        keys, paths = set(), set()
        for entry in entries:
            for dep, change in (entry.get("changed deps") or {}).items() if isinstance(entry, dict) else ():
                if isinstance(change, dict):
                    keys |= set(change)
                else:
                    paths.add(dep)
        reported[stage] = (keys, paths)
    return reported


def test_changing_any_params_key_changes_exactly_the_stages_that_read_it(locked):
    params = yaml.safe_load((locked / "params.yaml").read_text(encoding="utf-8"))
    for key in KEYS:  # one batch: dvc reports each stage's changed keys
        _set(params, key, _changed(_get(params, key)))
    (locked / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    reported = _reported(json.loads(_dvc(["status", "--json"], locked)))
    for key in KEYS:
        changed = {stage for stage, (keys, _) in reported.items() if covers(keys, key)}
        readers = {name for name, step in STAGES.items() if covers(step.params, key)}
        assert changed == readers, f"{key}: dvc status reports {sorted(changed)}, read by {sorted(readers)}"


def test_changing_any_source_file_changes_exactly_the_stages_that_run_it(locked):
    for path in SOURCES:
        with open(locked / path, "a", encoding="utf-8") as handle:
            handle.write("\n# changed\n")
    reported = _reported(json.loads(_dvc(["status", "--json"], locked)))
    for path in SOURCES:
        changed = {stage for stage, (_, paths) in reported.items() if covers(paths, path)}
        runners = {name for name, step in STAGES.items() if covers(step.code, path)}
        assert changed == runners, f"{path}: dvc status reports {sorted(changed)}, run by {sorted(runners)}"
