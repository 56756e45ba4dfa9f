"""Arguments that several steps of `defectvlm.steps` declare alike: the trained phases, the
registered version, the proposal detector, the split-shaped outputs and the evaluation's files."""

from __future__ import annotations

from defectvlm.step_types import File, Input, Output

SFT_HELP = "folder with native SFT files"
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")
EVALUATION_FILES = (
    File("predictions.jsonl"),
    File("inference.json"),
    File("report.md", cache=False),
    File("gallery"),
    File("metrics.json", "metrics", cache=False),
    *(File(f"plots/{p}.png", "plots", cache=False) for p in ("pr_curve", "roc_curve", "score_histogram")),
    File("plots/confusion_matrix.png", "plots", cache=False),
)


def trained_phases(upto: int) -> tuple[Input, ...]:
    """The trained phases a step reads from train.output_dir (in KFP: their adapter artifacts)."""
    return tuple(Input(f"phase{n}", f"train_phase{n}", "adapter", option=None) for n in range(1, upto))


def registered_model(option: str) -> Input:
    """The version `register` wrote (its registration.json); on the command line any model URI."""
    return Input(
        "registration",
        "register",
        "registration",
        option=option,
        help="models:/<name>@<alias>, models:/<name>/<version>, @<alias> (registry.model_name), a registration.json "
        "(the version `register` wrote), a run or an export folder",
        cli="required",
    )


def proposal_detector(when: str = "") -> Input:
    """The detector `train_detector` wrote; on the command line any detector, or the registered one."""
    return Input(
        "proposal_detector",
        "train_detector",
        "detector_run",
        option="--detector",
        help=f"{when}models:/<name>@<alias>, a train-detector folder, or an ONNX file (ours or an Ultralytics YOLO "
        "export); default: models:/<registry.model_name>-detector@candidate",
        cli="optional",
    )


def split_outputs(name: str, path: str, summary: str) -> Output:
    """A folder with train/val/test.jsonl and a summary file."""
    return Output(name, path, f"output folder (default: {path})", tuple(File(f) for f in (*SPLIT_FILES, summary)))
