"""What a pipeline component does, as library functions: write the step's parameter sections
to a params file and run the same `defectvlm <step>` command line as the DVC stage.

`STEPS` is the one table of the pipeline's steps: the CLI command each runs (paths as
`{placeholders}`) and the params.yaml sections it reads. The KFP components call `run_step`
(or the train / evaluate / register helpers); tests check the table against dvc.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from defectvlm.config import Params, params_from_dict, params_to_dict


@dataclass(frozen=True)
class Step:
    command: tuple[str, ...]  # `defectvlm` arguments; {in}, {out}, {reports}: paths the component fills in
    sections: tuple[str, ...]  # params.yaml sections the step reads (its pipeline parameters)


_TRAIN = ("model", "train", "tracking")

STEPS: dict[str, Step] = {
    "scan_labels": Step(("scan-labels", "--out", "{out}/label_stats.json"), ("data", "labels", "ingest")),
    "ingest": Step(("ingest", "--out", "{out}", "--quiet"), ("data", "labels", "ingest")),
    "split": Step(("split", "--in", "{in}", "--out", "{out}"), ("split",)),
    "regions": Step(("regions", "--in", "{in}", "--out", "{out}"), ("regions", "model")),
    "sft": Step(("build-sft", "--in", "{in}", "--out", "{out}"), ("sft",)),
    **{f"train_phase{n}": Step(("train", "--phase", str(n), "--in", "{in}"), _TRAIN) for n in (1, 2, 3)},
    "evaluate": Step(("evaluate", "--run", "last", "--in", "{in}", "--out", "{out}"), _TRAIN),
    "register": Step(
        ("register", "--run", "last", "--reports", "{reports}", "--in", "{in}", "--out", "{out}/registration.json"),
        (*_TRAIN, "registry"),
    ),
}

# Sections that are pipeline parameters (everything but `cluster`, which shapes the compiled pipeline).
RUNTIME_SECTIONS = tuple(f.name for f in dataclasses.fields(Params) if f.name != "cluster")


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
) -> dict:
    """Train one phase in the run folder, in this pod or as a TrainJob, and copy the phase
    folder without its checkpoints to `adapter`. A retried task resumes from the phase's last
    checkpoint. Returns the phase's metrics."""
    root = run_folder(cluster, job_id, earlier)
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
        run_trainjob(resolved.trainjob, resolved.cluster, phase, argv, train_image, job_id)
    else:
        run_training(argv)
    if out.exists():
        shutil.copytree(out, adapter, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    else:
        Path(adapter).mkdir(parents=True, exist_ok=True)
    metrics = Path(adapter) / "metrics.json"
    return json.loads(metrics.read_text(encoding="utf-8")) if metrics.exists() else {"enabled": False}


def run_on_phases(
    step: str, sections: dict[str, dict], cluster: dict, job_id: str, phases: dict[int, str], **paths: str
) -> None:
    """evaluate / register: run the step with the run folder as train.output_dir."""
    params = _with_output_dir(sections, run_folder(cluster, job_id, phases))
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(command(step, write_params(params, Path(tmp) / "params.yaml"), **paths))
