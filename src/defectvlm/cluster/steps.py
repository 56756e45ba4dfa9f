"""What a pipeline component does, as library functions: write the step's parameter sections
to a params file and run the same `defectvlm <step>` command line as the DVC stage.

`STEPS` is the one table of the pipeline's steps: the CLI command each runs (paths as
`{placeholders}`), the params.yaml sections its KFP task receives, the exact params keys it reads
and the source files it runs. dvc.yaml's `params` and source `deps` are written from it
(`defectvlm pipeline dvc`); tests record what each step really reads and check the table and
dvc.yaml against it. The KFP components call `run_step` (or the train / evaluate / register helpers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from defectvlm.config import Params, params_from_dict, params_to_dict
from defectvlm.tracking.lineage import DATA_VERSION_ENV, DATA_VERSION_FILE, LINEAGE_DIR


@dataclass(frozen=True)
class Step:
    command: tuple[str, ...]  # `defectvlm` arguments; {in}, {out}, {reports}: paths the component fills in
    sections: tuple[str, ...]  # params.yaml sections the KFP task receives (its pipeline parameters)
    params: tuple[str, ...]  # the exact params keys the step reads (a section or sub-section: all its keys)
    code: tuple[str, ...]  # the source files (or folders) whose code the step runs: its DVC code deps


_SRC = "src/defectvlm/"
_CORE = tuple(_SRC + f for f in ("cli.py", "config.py", "io.py"))
_DATA_KEYS = ("data.abnormal_root", "data.normal_root")
_LABEL_KEYS = ("labels.format", "labels.coord_format", "labels.label_map")
_SCAN_KEYS = ("ingest.verify", "ingest.image_extensions", "ingest.workers")
_SCAN_CODE = tuple(_SRC + f"data/{f}.py" for f in ("images", "ingest", "labels", "pairing"))
_MODEL_CODE = tuple(_SRC + f"models/{f}.py" for f in ("attention", "families", "loading", "tiny", "tiny_families"))
_TRAIN_KEYS = tuple(
    f"train.{key}"
    for key in (
        "output_dir", "deepspeed", "seed", "batch_size", "grad_accum", "max_length", "group_by_length",
        "warmup_ratio", "weight_decay", "max_grad_norm", "gradient_checkpointing", "qlora", "logging_steps",
        "eval_steps", "save_steps", "save_total_limit", "metric_for_best_model", "greater_is_better", "lora",
    )
)  # fmt: skip
# training picks its best checkpoint with the scoring pass (evaluate/), whose answers use the templates
_TRAIN_CODE = (
    *_CORE,
    *_MODEL_CODE,
    *(_SRC + f"train/{f}.py" for f in ("artifacts", "data", "loop", "phases")),
    *(_SRC + f"evaluate/{f}.py" for f in ("metrics", "scoring")),
    _SRC + "data/sft.py",
    _SRC + "data/templates",
)
# the adapter carries the prompt it was trained with (best/prompt.json), built from these
_PROMPT_KEYS = tuple(
    f"sft.{key}" for key in ("crop_size", "knowledge", "language", "region_encoding", "summary", "templates")
)
_PHASES_ENABLED = tuple(f"train.phase{n}.enabled" for n in (1, 2, 3))
_TRACKING = ("model", "train", "tracking")


def _train(n: int) -> Step:
    earlier = tuple(f"train.phase{k}.enabled" for k in range(1, n))  # where the phase starts from
    command = ("train", "--phase", str(n), "--in", "{in}")
    params = ("model", *_PROMPT_KEYS, *_TRAIN_KEYS, f"train.phase{n}", *earlier)
    return Step(command, (*_TRACKING, "sft"), params, _TRAIN_CODE)


STEPS: dict[str, Step] = {
    "scan_labels": Step(
        ("scan-labels", "--out", "{out}/label_stats.json"),
        ("data", "labels", "ingest"),
        (*_DATA_KEYS, *_LABEL_KEYS, *_SCAN_KEYS),
        (*_CORE, *_SCAN_CODE, _SRC + "data/label_stats.py"),
    ),
    "ingest": Step(
        ("ingest", "--out", "{out}", "--quiet"),
        ("data", "labels", "ingest"),
        (*_DATA_KEYS, "labels", "ingest"),
        (*_CORE, *_SCAN_CODE, _SRC + "data/found.py", _SRC + "data/records.py"),
    ),
    "split": Step(
        ("split", "--in", "{in}", "--out", "{out}"),
        ("split",),
        ("split",),
        (*_CORE, _SRC + "data/split.py", _SRC + "seeding.py"),
    ),
    "regions": Step(
        ("regions", "--in", "{in}", "--out", "{out}"),
        ("regions", "model"),
        ("regions", "model.family", "model.min_pixels", "model.max_pixels"),
        (*_CORE, _SRC + "data/regions.py", _SRC + "models/families.py", _SRC + "seeding.py"),
    ),
    # a swift / llamafactory / yolo export writes images in the model family's frame
    "sft": Step(
        ("build-sft", "--in", "{in}", "--out", "{out}"),
        ("sft", "model"),
        ("sft", "model.family", "model.name_or_path", "model.min_pixels", "model.max_pixels"),
        (
            *_CORE,
            *(_SRC + f"data/{f}.py" for f in ("exports", "images", "sft", "yolo_export")),
            _SRC + "models/families.py",
            _SRC + "data/templates",
            _SRC + "seeding.py",
        ),
    ),
    **{f"train_phase{n}": _train(n) for n in (1, 2, 3)},
    "evaluate": Step(
        ("evaluate", "--run", "last", "--in", "{in}", "--out", "{out}"),
        _TRACKING,
        ("model", "train.output_dir", *_PHASES_ENABLED),
        (
            *_CORE,
            *_MODEL_CODE,
            *(_SRC + f"evaluate/{f}.py" for f in ("metrics", "report", "run", "scoring")),
            _SRC + "inference/loading.py",
            *(_SRC + f"train/{f}.py" for f in ("artifacts", "data", "phases")),
            _SRC + "data/templates",
        ),
    ),
    # the cascade's proposal detector: trained on the split's train/val (test never read), its output
    # folder is detector.output_dir, registered as <registry.model_name>-detector
    "train_detector": Step(
        ("train-detector", "--in", "{in}"),
        ("detector", "regions", "registry", "tracking"),
        ("detector", "regions.min_box_size", "regions.max_boxes_per_image", "registry.model_name"),
        (
            *_CORE,
            *(_SRC + f"detector/{f}.py" for f in ("cli", "data", "metrics", "model", "runtime", "tracking", "train")),
            _SRC + "data/regions.py",
            _SRC + "train/data.py",
            *(_SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry")),
        ),
    ),
    # its output is the registry entry and its lineage tags (data roots: their DVC digests)
    "register": Step(
        ("register", "--run", "last", "--reports", "{reports}", "--in", "{in}", "--out", "{out}/registration.json"),
        ("data", *_TRACKING, "registry"),
        (*_DATA_KEYS, "registry.model_name", "tracking", "train.output_dir", *_PHASES_ENABLED),
        (
            *_CORE,
            _SRC + "evaluate/run.py",
            _SRC + "train/artifacts.py",
            *(_SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry")),
        ),
    ),
}

# Sections that are pipeline parameters (everything but `cluster`, which shapes the compiled pipeline).
RUNTIME_SECTIONS = tuple(f.name for f in dataclasses.fields(Params) if f.name != "cluster")


def dvc_yaml(current: dict) -> str:
    """dvc.yaml with every stage's `params` and source deps (src/) from STEPS; the other deps,
    the commands and the outputs come from `current` (the parsed dvc.yaml)."""
    stages = {}
    for name, stage in current["stages"].items():
        data_deps = [dep for dep in stage.get("deps", []) if not dep.startswith("src/")]
        stages[name] = {**stage, "deps": [*data_deps, *STEPS[name].code], "params": list(STEPS[name].params)}
    body = yaml.safe_dump({"stages": stages}, allow_unicode=True, sort_keys=False, width=120)
    return DVC_HEADER + body


DVC_HEADER = """\
# Local, cached pipeline: `dvc repro`. Paths come from params.yaml (${...}), so the same names
# drive the CLI, these stages and the cluster pipeline. Each stage's `params` (the exact keys
# its step reads) and source deps are written by `defectvlm pipeline dvc` from
# defectvlm.cluster.steps.STEPS; edit the table there, not these lists.
"""


def params_from_sections(sections: dict[str, dict]) -> Params:
    """Params from the sections a component received; other sections keep their defaults.

    KFP passes dict parameters as protobuf Structs, whose numbers are all floats: integer
    fields get their int back before validation."""
    hints = typing.get_type_hints(Params)
    return params_from_dict({name: _restore_ints(hints[name], values) for name, values in sections.items()})


def _restore_ints(cls: type, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    restored = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            restored[name] = _restore_ints(hint, value)
        elif hint is int and isinstance(value, float) and value.is_integer():
            restored[name] = int(value)
    return restored


def write_params(params: Params, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def command(step: str, params_file: Path, **paths: str) -> list[str]:
    """The step's `defectvlm` argv with its paths filled in."""
    return [part.format(**paths) for part in STEPS[step].command] + ["--params", str(params_file)]


def run_cli(argv: list[str]) -> None:
    from defectvlm.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`defectvlm {' '.join(argv)}` exited with {code}")


def run_step(step: str, sections: dict[str, dict], **paths: str) -> None:
    """Run a data step (scan_labels ... sft) with its sections."""
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(command(step, write_params(params_from_sections(sections), Path(tmp) / "params.yaml"), **paths))


def run_training(argv: list[str]) -> None:
    """`defectvlm train ...` in this pod: one process, or one per GPU under torchrun."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        subprocess.run([*torchrun, "-m", "defectvlm", *argv], check=True)
    else:
        run_cli(argv)


def run_folder(cluster: dict, job_id: str, phases: dict[int, str]) -> Path:
    """<cluster.workspace>/runs/<job_id>: the train.output_dir of a pipeline run, shared by its
    train, evaluate and register steps, with every phase in `phases` (KFP artifacts) present.

    A phase trained in this run is already there (with its checkpoints); one served from the
    cache is copied in. The trainer pods of a TrainJob see this folder, not a step's artifacts."""
    root = Path(params_from_sections({"cluster": cluster}).cluster.workspace) / "runs" / job_id
    for number, path in phases.items():
        if not (root / f"phase{number}").exists():
            shutil.copytree(path, root / f"phase{number}")
    return root


def record_lineage(root: Path, data_version: str, lineage: dict[str, str]) -> None:
    """The run's data version and the dvc.lock / .dvc files that pin it, in the run folder (where
    every step and TrainJob pod of the run reads them) and the data version in this step's environment."""
    folder = root / LINEAGE_DIR
    for path, text in lineage.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATA_VERSION_FILE).write_text(data_version, encoding="utf-8")
    os.environ[DATA_VERSION_ENV] = data_version


def _with_output_dir(sections: dict[str, dict], root: Path) -> Params:
    return params_from_sections({**sections, "train": {**sections["train"], "output_dir": str(root)}})


def train_phase(
    phase: int,
    sections: dict[str, dict],
    trainjob: dict,
    cluster: dict,
    sft: str,
    earlier: dict[int, str],
    job_id: str,
    adapter: str,
    data_version: str,
    lineage: dict[str, str],
) -> dict:
    """Train one phase in the run folder, in this pod or as a TrainJob, and copy the phase
    folder without its checkpoints to `adapter`. A retried task resumes from the phase's last
    checkpoint. Returns the phase's metrics."""
    root = run_folder(cluster, job_id, earlier)
    record_lineage(root, data_version, lineage)
    shutil.copytree(sft, root / "sft", dirs_exist_ok=True)
    params = _with_output_dir(sections, root)
    params_file = write_params(params, root / f"params_phase{phase}.yaml")
    argv = command(f"train_phase{phase}", params_file, **{"in": str(root / "sft")})
    out = root / f"phase{phase}"
    if (out / "checkpoints" / "latest").exists():
        argv.append("--resume")
    if params.train.launcher == "trainjob":
        from defectvlm.cluster.images import image
        from defectvlm.cluster.trainjob import run_trainjob

        resolved = params_from_sections({"cluster": cluster, "trainjob": trainjob})
        train_image = image("train", resolved.cluster.image_registry)
        run_trainjob(resolved.trainjob, resolved.cluster, phase, argv, train_image)
    else:
        run_training(argv)
    if out.exists():
        shutil.copytree(out, adapter, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    else:
        Path(adapter).mkdir(parents=True, exist_ok=True)
    metrics = Path(adapter) / "metrics.json"
    return json.loads(metrics.read_text(encoding="utf-8")) if metrics.exists() else {"enabled": False}


def run_on_phases(
    step: str,
    sections: dict[str, dict],
    cluster: dict,
    job_id: str,
    phases: dict[int, str],
    data_version: str,
    lineage: dict[str, str],
    **paths: str,
) -> None:
    """evaluate / register: run the step with the run folder as train.output_dir."""
    root = run_folder(cluster, job_id, phases)
    record_lineage(root, data_version, lineage)
    params = _with_output_dir(sections, root)
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(command(step, write_params(params, Path(tmp) / "params.yaml"), **paths))
