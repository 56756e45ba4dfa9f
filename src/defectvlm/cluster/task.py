"""What a KFP task does, in its pod: rebuild the params from the sections it received, put its
artifacts where the step expects them, call the step's function in-process (a training step:
torchrun or a TrainJob when it needs several processes), then turn its outputs into artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel

from defectvlm.config import Params, params_from_dict, params_to_dict
from defectvlm.step_types import Step, dest, source
from defectvlm.steps import STEPS
from defectvlm.tracking.lineage import DATA_VERSION_ENV, DATA_VERSION_FILE, LINEAGE_DIR


def run_task(name: str, values: dict, steps: dict[str, Step] = STEPS) -> None:
    """Run step `name` with the component's arguments (`values`: sections, artifacts, run info)."""
    step = steps[name]
    sections = {section: values[section] for section in step.sections}
    root = None
    if step.cluster.run_folder:
        root = Path(params_from_sections({"cluster": values["cluster"]}).cluster.workspace) / "runs" / values["job_id"]
        record_lineage(root, values["data_version"], values["lineage"])
        sections["train"] = {**sections["train"], "output_dir": str(root)}
    params = params_from_sections(sections)
    arguments = {dest(o): step.fixed.get(dest(o), o.default) for o in step.options if not o.sets}
    for needed in step.inputs:
        artifact = values[needed.name].path
        if needed.option is None:  # where the step finds it through params: on the run folder
            place = Path(_interpolate(source(needed, steps).path, params))
            if not place.exists():
                shutil.copytree(artifact, place)
        elif needed.uri:
            arguments[dest(needed)] = values[needed.name].uri
        elif step.cluster.launcher:  # trainer pods see the workspace, not this pod's artifacts
            shutil.copytree(artifact, root / needed.step, dirs_exist_ok=True)
            arguments[dest(needed)] = str(root / needed.step / needed.file)
        else:
            arguments[dest(needed)] = str(Path(artifact) / needed.file) if needed.file else artifact
    for output in step.outputs:
        if output.option:
            folder = Path(values[output.name].path)
            if Path(output.path).suffix:  # one file: in the artifact's folder
                folder.mkdir(parents=True, exist_ok=True)
                arguments[dest(output)] = str(folder / Path(output.path).name)
            else:
                arguments[dest(output)] = str(folder)
        elif step.cluster.resume_marker:  # a retried task continues from the last checkpoint
            arguments["resume"] = (Path(_interpolate(output.path, params)) / step.cluster.resume_marker).exists()
    if step.cluster.launcher:
        code = _launch(step, params, arguments, root, values)
    else:
        code = step.function(params, **arguments)
    if code:
        raise RuntimeError(f"step {name} exited with {code}")
    _collect(step, params, values)


def _launch(step: Step, params: Params, arguments: dict, root: Path, values: dict) -> int:
    """A training step: in-process on one GPU, torchrun on several, or a TrainJob (train.launcher)."""
    import torch

    gpus = torch.cuda.device_count()
    if params.train.launcher != "trainjob" and gpus <= 1:
        return step.function(params, **arguments)
    params_file = write_params(params, root / f"params_{step.name}.yaml")  # what the other processes read
    argv = [*step.argv(arguments), "--params", str(params_file)]
    if params.train.launcher == "trainjob":
        from defectvlm.cluster import trainjob
        from defectvlm.cluster.images import image

        resolved = params_from_sections({"cluster": values["cluster"], "trainjob": values["trainjob"]})
        train_image = image("train", resolved.cluster.image_registry)
        phase = step.fixed["phase"]
        trainjob.run_trainjob(resolved.trainjob, resolved.cluster, phase, argv, train_image, values["job_id"])
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        subprocess.run([*torchrun, "-m", "defectvlm", *argv], check=True)
    return 0


def _collect(step: Step, params: Params, values: dict) -> None:
    """Outputs written where params say become artifacts; declared metadata and metrics are logged."""
    for output in step.outputs:
        artifact = values[output.name]
        if output.option is None:
            written = Path(_interpolate(output.path, params))
            if written.exists():
                ignore = shutil.ignore_patterns(*output.leave)
                shutil.copytree(written, artifact.path, ignore=ignore, dirs_exist_ok=True)
            else:
                Path(artifact.path).mkdir(parents=True, exist_ok=True)
        if step.cluster.data_version:
            artifact.metadata["data_version"] = values["data_version"]
        if output.metadata:
            file, _, key = output.metadata.partition(":")
            if (Path(artifact.path) / file).exists():
                record = json.loads((Path(artifact.path) / file).read_text(encoding="utf-8"))
                record = record[key] if key else record
                artifact.metadata.update({k: v for k, v in record.items() if isinstance(v, int | float | str | bool)})
        for file in output.files:
            if file.kind == "metrics":
                figures = json.loads((Path(artifact.path) / file.name).read_text(encoding="utf-8"))
                for metric, value in _numbers(figures):
                    values["metrics"].log_metric(metric, value)


def _numbers(tree: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numeric leaves of a metrics file, keys joined by `_` (test_roi_f1)."""
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _numbers(value, f"{prefix}{key}_")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append((f"{prefix}{key}", value))
    return found


def _interpolate(path: str, params: Params) -> str:
    """A declared path with its `${section.key}` filled in from params."""
    values = params_to_dict(params)

    def lookup(match: re.Match) -> str:
        value = values
        for part in match[1].split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", lookup, path)


def params_from_sections(sections: dict[str, dict]) -> Params:
    """Params from the sections a component received; other sections keep their defaults.

    KFP passes dict parameters as protobuf Structs, whose numbers are all floats: integer
    fields get their int back before validation."""
    return params_from_dict({name: _restore_ints(Params, name, values) for name, values in sections.items()})


def _restore_ints(model: type[BaseModel], name: str, value):
    info = model.model_fields.get(name)
    hint = info.annotation if info else None
    if isinstance(hint, type) and issubclass(hint, BaseModel) and isinstance(value, dict):
        return {key: _restore_ints(hint, key, inner) for key, inner in value.items()}
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def write_params(params: Params, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


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
