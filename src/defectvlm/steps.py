"""The pipeline's steps, each declared once.

A `Step` (`defectvlm.step_types`) names its function (in `defectvlm.step_functions`), its inputs (outputs of earlier
steps), its outputs (paths, and which files are metrics or plots), the exact params keys it reads,
the source files it runs and its resources on the cluster. From `STEPS` come the CLI subcommands
(`defectvlm.cli`), dvc.yaml (`defectvlm.dvc_stages`, written by `defectvlm pipeline dvc`) and the
KFP components and pipeline (`defectvlm.cluster.components`, `defectvlm.cluster.dag`). Adding a
step means writing its function and appending its declaration here.
"""

from __future__ import annotations

from defectvlm import step_functions as run
from defectvlm.step_types import Cluster, File, Input, Option, Output, Step

_SRC = "src/defectvlm/"
_CORE = tuple(_SRC + f for f in ("cli.py", "config.py", "io.py", "step_functions.py"))
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
    *(_SRC + f"train/{f}.py" for f in ("artifacts", "data", "distributed", "loop", "phases", "validation")),
    *(_SRC + f"evaluate/{f}.py" for f in ("metrics", "scoring")),
    _SRC + "data/sft.py",
    _SRC + "data/templates",
)
# the adapter carries the prompt it was trained with (best/prompt.json), built from these
_PROMPT_KEYS = tuple(
    f"sft.{key}" for key in ("crop_size", "knowledge", "language", "region_encoding", "summary", "templates")
)
_PHASES_ENABLED = tuple(f"train.phase{n}.enabled" for n in (1, 2, 3))
_SFT_HELP = "folder with native SFT files"
_RAW = ("${data.abnormal_root}", "${data.normal_root}")


def _phases(upto: int) -> tuple[Input, ...]:
    """The trained phases a step reads from train.output_dir (in KFP: their adapter artifacts)."""
    return tuple(Input(f"phase{n}", f"train_phase{n}", "adapter", option=None) for n in range(1, upto))


def _train(n: int) -> Step:
    earlier = tuple(f"train.phase{k}.enabled" for k in range(1, n))  # where the phase starts from
    return Step(
        f"train_phase{n}",
        "train",
        run.train,
        "Train one phase (1: projector + LM LoRA, 2: + top vision LoRA, 3: + top vision blocks) with DeepSpeed. "
        "Several processes: torchrun --nproc_per_node N -m defectvlm train --phase 1",
        (
            Option("--phase", type=int, choices=(1, 2, 3), required=True),
            Input("conversations", "sft", "conversations", ("train.jsonl", "val.jsonl"), help=_SFT_HELP),
            Option("--resume", "continue from the phase's last checkpoint", switch=True),
            Option("--no-tracking", "do not log to MLflow", switch=True),
            *_phases(n),
            Output(
                "adapter",
                f"${{train.output_dir}}/phase{n}",
                option=None,
                artifact="Model",
                metadata="metrics.json",
                leave=("checkpoints",),
            ),
        ),
        ("model", *_PROMPT_KEYS, *_TRAIN_KEYS, f"train.phase{n}", *earlier),
        _TRAIN_CODE,
        deps=("configs/deepspeed",),
        fixed={"phase": n},
        cluster=Cluster(
            "train", gpu=True, retry=False, run_folder=True, launcher=True, resume_marker="checkpoints/latest"
        ),
        component="train_phase",
    )


_EVALUATION_FILES = (
    File("predictions.jsonl"),
    File("inference.json"),
    File("report.md", cache=False),
    File("gallery"),
    File("metrics.json", "metrics", cache=False),
    *(File(f"plots/{p}.png", "plots", cache=False) for p in ("pr_curve", "roc_curve", "score_histogram")),
    File("plots/confusion_matrix.png", "plots", cache=False),
)
_SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


def _split_outputs(name: str, path: str, summary: str) -> Output:
    return Output(name, path, f"output folder (default: {path})", tuple(File(f) for f in (*_SPLIT_FILES, summary)))


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step(
            "scan_labels",
            "scan-labels",
            run.scan_labels,
            "Label distribution, box sizes, and a label_map block to paste.",
            (
                Output(
                    "label_stats",
                    "data/label_stats.json",
                    "statistics file (default: data/label_stats.json)",
                    artifact="Artifact",
                    cache=False,
                ),
            ),
            (*_DATA_KEYS, *_LABEL_KEYS, *_SCAN_KEYS),
            (*_CORE, *_SCAN_CODE, _SRC + "data/label_stats.py"),
            deps=_RAW,
            cluster=Cluster(data_version=True),
        ),
        Step(
            "ingest",
            "ingest",
            run.ingest,
            "Both image trees -> manifest.jsonl + ingest_report.json (every file accounted for).",
            (
                Output(
                    "ingested",
                    "data/01_ingested",
                    "output folder (default: data/01_ingested)",
                    (File("manifest.jsonl"), File("ingest_report.json")),
                    metadata="ingest_report.json:counts",
                ),
                Option("--quiet", "no progress bar", switch=True),
            ),
            (*_DATA_KEYS, "labels", "ingest"),
            (*_CORE, *_SCAN_CODE, _SRC + "data/found.py", _SRC + "data/records.py"),
            deps=_RAW,
            fixed={"quiet": True},
            cluster=Cluster(data_version=True),
        ),
        Step(
            "split",
            "split",
            run.split,
            "manifest -> train/val/test by group, stable under data growth, no leakage.",
            (
                Input("ingested", "ingest", "ingested", ("manifest.jsonl",), help="folder with manifest.jsonl"),
                _split_outputs("splits", "data/02_split", "split_report.json"),
            ),
            ("split",),
            (*_CORE, _SRC + "data/split.py", _SRC + "seeding.py"),
        ),
        Step(
            "regions",
            "regions",
            run.regions,
            "splits -> ROI candidates with negatives and decoys, in the model's frame.",
            (
                Input("splits", "split", "splits", _SPLIT_FILES, help="folder with the split files"),
                _split_outputs("candidates", "data/03_regions", "regions_summary.json"),
            ),
            ("regions", "model.family", "model.min_pixels", "model.max_pixels"),
            (*_CORE, _SRC + "data/regions.py", _SRC + "models/families.py", _SRC + "seeding.py"),
        ),
        # a swift / llamafactory / yolo export writes images in the model family's frame
        Step(
            "sft",
            "build-sft",
            run.build_sft,
            "regions -> SFT conversations (native; ms-swift/LLaMA-Factory/YOLO export).",
            (
                Input("candidates", "regions", "candidates", _SPLIT_FILES, help="folder with the region files"),
                _split_outputs("conversations", "data/04_sft", "sft_summary.json"),
                Option(
                    "--format",
                    "sets sft.format",
                    choices=("native", "swift", "llamafactory", "yolo"),
                    sets="sft.format",
                ),
            ),
            ("sft", "model.family", "model.name_or_path", "model.min_pixels", "model.max_pixels"),
            (
                *_CORE,
                *(_SRC + f"data/{f}.py" for f in ("exports", "images", "sft", "yolo_export")),
                _SRC + "models/families.py",
                _SRC + "data/templates",
                _SRC + "seeding.py",
            ),
        ),
        *(_train(n) for n in (1, 2, 3)),
        Step(
            "evaluate",
            "evaluate",
            run.evaluate,
            "ROI- and image-level metrics, threshold from val, plots and a report.",
            (
                Option("--run", "runs/phaseN, 'last' (last enabled phase) or 'base' (untrained)", default="last"),
                Option("--split", default="test", choices=("val", "test")),
                Option("--mode", "teacher-forced scores or free text", default="score", choices=("score", "generate")),
                Input(
                    "conversations",
                    "sft",
                    "conversations",
                    ("val.jsonl", "test.jsonl", "sft_summary.json"),
                    help=_SFT_HELP,
                ),
                Output(
                    "reports", "reports", "output folder (default: reports)", _EVALUATION_FILES, artifact="Artifact"
                ),
                Option("--no-baseline", "skip evaluating the untrained base", switch=True),
                Option("--no-tracking", "do not log to the phase's MLflow run", switch=True),
                Option("--cascade", "detector alone vs detector + VLM on test (into OUT/cascade)", switch=True),
                Option("--detector", "--cascade: models:/..., a train-detector folder or an ONNX file"),
                Option("--split-dir", "--cascade: the split files (boxes of val and test)", default="data/02_split"),
                *_phases(4),
            ),
            ("model", "train.output_dir", *_PHASES_ENABLED),
            (
                *_CORE,
                *_MODEL_CODE,
                *(_SRC + f"evaluate/{f}.py" for f in ("metrics", "report", "run", "scoring")),
                _SRC + "inference/loading.py",
                *(_SRC + f"train/{f}.py" for f in ("artifacts", "data")),
                _SRC + "data/templates",
            ),
            fixed={"run": "last"},
            cluster=Cluster("train", gpu=True, cache=False, run_folder=True),
        ),
        # the cascade's proposal detector: trained on the split's train/val (test never read), its output
        # folder is detector.output_dir, registered as <registry.model_name>-detector
        Step(
            "train_detector",
            "train-detector",
            run.train_detector,
            "Train the cascade's proposal detector on the split's train/val (test never read): weights, ONNX "
            "export, val mAP@0.5 and recall at the proposal budget; logged to MLflow and registered as "
            "<registry.model_name>-detector.",
            (
                Input("splits", "split", "splits", ("train.jsonl", "val.jsonl"), help="folder with train/val.jsonl"),
                Option("--no-tracking", "do not log to MLflow or register", switch=True),
                Output(
                    "detector_run", "${detector.output_dir}", option=None, artifact="Model", metadata="metrics.json"
                ),
            ),
            (
                *_DATA_KEYS,
                "detector",
                "regions.min_box_size",
                "regions.max_boxes_per_image",
                "registry.model_name",
                "tracking",
                "train.output_dir",
            ),
            (
                *_CORE,
                *(_SRC + f"detector/{f}.py" for f in ("data", "metrics", "model", "runtime", "tracking", "train")),
                _SRC + "train/data.py",
                *(_SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry")),
            ),
            cluster=Cluster(cache=False),
        ),
        # its output is the registry entry and its lineage tags (data roots: their DVC digests)
        Step(
            "register",
            "register",
            run.register,
            "Register the evaluated adapter as a new model version (alias candidate).",
            (
                Option("--run", "runs/phaseN or 'last' (the last enabled phase)", default="last"),
                Input(
                    "reports",
                    "evaluate",
                    "reports",
                    ("metrics.json", "inference.json"),
                    option="--reports",
                    help="the evaluation of that run (metrics.json, inference.json)",
                ),
                Input(
                    "conversations",
                    "sft",
                    "conversations",
                    ("test.jsonl",),
                    help="folder with the SFT splits (lineage digests)",
                ),
                Output(
                    "registration",
                    "reports/registration.json",
                    "where the registered name/version are written",
                    artifact="Artifact",
                    cache=False,
                    metadata="registration.json",
                ),
                *_phases(4),
            ),
            (*_DATA_KEYS, "registry.model_name", "tracking", "train.output_dir", *_PHASES_ENABLED),
            (
                *_CORE,
                _SRC + "evaluate/run.py",
                _SRC + "serve/pyfunc.py",
                _SRC + "train/artifacts.py",
                *(_SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry")),
            ),
            fixed={"run": "last"},
            cluster=Cluster(cache=False, run_folder=True),
        ),
    )
}
