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
from defectvlm import step_reads as reads
from defectvlm.step_parts import (
    EVALUATION_FILES,
    SFT_HELP,
    SPLIT_FILES,
    proposal_detector,
    registered_model,
    split_outputs,
    trained_phases,
)
from defectvlm.step_types import Cluster, File, Input, Option, Output, Step


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
            Input("conversations", "sft", "conversations", ("train.jsonl", "val.jsonl"), help=SFT_HELP),
            Option("--resume", "continue from the phase's last checkpoint", switch=True),
            Option("--no-tracking", "do not log to MLflow", switch=True),
            *trained_phases(n),
            Output(
                "adapter",
                f"${{train.output_dir}}/phase{n}",
                option=None,
                artifact="Model",
                metadata="metrics.json",
                leave=("checkpoints",),
            ),
        ),
        ("model", *reads.PROMPT_KEYS, *reads.TRAIN_KEYS, f"train.phase{n}", *earlier),
        reads.TRAIN_CODE,
        deps=("configs/deepspeed",),
        fixed={"phase": n},
        cluster=Cluster(
            "train", gpu=True, retry=False, run_folder=True, launcher=True, resume_marker="checkpoints/latest"
        ),
    )


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
            (*reads.DATA_KEYS, *reads.LABEL_KEYS, *reads.SCAN_KEYS),
            (*reads.CORE, *reads.SCAN_CODE, reads.SRC + "data/label_stats.py"),
            deps=reads.RAW,
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
            (*reads.DATA_KEYS, "labels", "ingest"),
            (*reads.CORE, *reads.SCAN_CODE, reads.SRC + "data/found.py", reads.SRC + "data/records.py"),
            deps=reads.RAW,
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
                split_outputs("splits", "data/02_split", "split_report.json"),
            ),
            ("split",),
            (*reads.CORE, reads.SRC + "data/split.py", reads.SRC + "seeding.py"),
        ),
        Step(
            "regions",
            "regions",
            run.regions,
            "splits -> ROI candidates with negatives and decoys, in the model's frame.",
            (
                Input("splits", "split", "splits", SPLIT_FILES, help="folder with the split files"),
                split_outputs("candidates", "data/03_regions", "regions_summary.json"),
            ),
            ("regions", "model.family", "model.min_pixels", "model.max_pixels", *reads.OUT_OF_FOLD_KEYS),
            reads.REGIONS_CODE,
        ),
        # a swift / llamafactory / yolo export writes images in the model family's frame
        Step(
            "sft",
            "build-sft",
            run.build_sft,
            "regions -> SFT conversations (native; ms-swift/LLaMA-Factory/YOLO export).",
            (
                Input("candidates", "regions", "candidates", SPLIT_FILES, help="folder with the region files"),
                split_outputs("conversations", "data/04_sft", "sft_summary.json"),
                Option(
                    "--format",
                    "sets sft.format",
                    choices=("native", "swift", "llamafactory", "yolo"),
                    sets="sft.format",
                ),
            ),
            ("sft", "model.family", "model.name_or_path", "model.min_pixels", "model.max_pixels"),
            (
                *reads.CORE,
                *(reads.SRC + f"data/{f}.py" for f in ("exports", "images", "sft", "yolo_export")),
                reads.SRC + "models/families.py",
                reads.SRC + "data/templates",
                reads.SRC + "seeding.py",
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
                    help=SFT_HELP,
                ),
                Output("reports", "reports", "output folder (default: reports)", EVALUATION_FILES, artifact="Artifact"),
                Option("--no-baseline", "skip evaluating the untrained base", switch=True),
                Option("--no-tracking", "do not log to the phase's MLflow run", switch=True),
                *trained_phases(4),
            ),
            ("model", "train.output_dir", *reads.PHASES_ENABLED),
            (
                *reads.CORE,
                *reads.MODEL_CODE,
                *(
                    reads.SRC + f"evaluate/{f}.py"
                    for f in ("metrics", "plot_fonts", "report", "run", "scoring", "shared_prefix")
                ),
                reads.SRC + "inference/loading.py",
                *(reads.SRC + f"train/{f}.py" for f in ("artifacts", "data")),
                reads.SRC + "data/images.py",
                reads.SRC + "data/templates",
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
                *reads.DATA_KEYS,
                "detector",
                "regions.min_box_size",
                "regions.max_boxes_per_image",
                "registry.model_name",
                "tracking",
                "train.output_dir",
            ),
            (
                *reads.CORE,
                *(reads.SRC + f"detector/{f}.py" for f in ("data", "loading", "metrics", "model", "outputs")),
                *(reads.SRC + f"detector/{f}.py" for f in ("runtime", "tracking", "train", "ultralytics_backend")),
                *(reads.SRC + f"data/{f}.py" for f in ("boxes", "images", "yolo_export")),
                *(reads.SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry", "store_lock")),
            ),
            cluster=Cluster(cache=False),
        ),
        # the system, not the parts: the detector's proposals judged by the VLM, every threshold from val
        Step(
            "evaluate_cascade",
            "evaluate-cascade",
            run.evaluate_cascade,
            "Detector alone vs detector + VLM vs both agree on the test images (thresholds from val): box-level "
            "precision, recall, false alarms per image, per class, a PR plot and pictures of what the VLM changed.",
            (
                Option("--run", "runs/phaseN or 'last' (the last enabled phase)", default="last"),
                Input("splits", "split", "splits", ("val.jsonl", "test.jsonl"), help="folder with val/test.jsonl"),
                proposal_detector(),
                Output(
                    "cascade",
                    "reports/cascade",
                    "output folder (default: reports/cascade)",
                    (
                        File("cascade_metrics.json", "metrics", cache=False),
                        File("cascade_report.md", cache=False),
                        File("plots/cascade_pr.png", "plots", cache=False),
                        File("gallery"),
                    ),
                    artifact="Artifact",
                ),
                *trained_phases(4),
            ),
            ("train.output_dir", *reads.PHASES_ENABLED, *reads.PROPOSAL_KEYS, "regions.min_box_size"),
            (
                *reads.SCORING_CODE,
                *(reads.SRC + f"evaluate/{f}.py" for f in ("cascade", "cascade_cli", "metrics", "run")),
                *(reads.SRC + f"detector/{f}.py" for f in ("data", "loading", "metrics", "runtime")),
            ),
            fixed={"run": "last"},
            cluster=Cluster("train", gpu=True),
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
                    result=True,
                ),
                *trained_phases(4),
            ),
            (*reads.DATA_KEYS, "registry.model_name", "tracking", "train.output_dir", *reads.PHASES_ENABLED),
            (
                *reads.CORE,
                reads.SRC + "evaluate/run.py",
                reads.SRC + "serve/pyfunc.py",
                reads.SRC + "train/artifacts.py",
                *(reads.SRC + f"tracking/{f}.py" for f in ("lineage", "mlflow_tracking", "registry", "store_lock")),
            ),
            fixed={"run": "last"},
            cluster=Cluster(cache=False, run_folder=True),
        ),
        # the stage's and task's model: the version `register` wrote (`@candidate` may be another
        # pipeline run's); the proposals: this pipeline's detector
        Step(
            "predict",
            "predict",
            run.predict,
            "Run a model on new images: predictions.jsonl, predictions.csv and report.html. Regions from --regions "
            "(boxes .jsonl, a folder of YOLO prediction .txt files, or a Label Studio .json export) or "
            "--proposals detector; without either, a grid of windows the size of the median training defect.",
            (
                registered_model("--model"),
                Input(
                    "images",
                    "split",
                    "splits",
                    ("test.jsonl",),
                    option="--images",
                    help="a folder (recursive), a glob, or a manifest (.jsonl or .txt)",
                    file="test.jsonl",
                    cli="required",
                ),
                Output(
                    "predictions",
                    "reports/predict",
                    "output folder (default: reports/predict)",
                    (File("predictions.jsonl"), File("predictions.csv"), File("report.html", cache=False)),
                    artifact="Artifact",
                ),
                Option(
                    "--regions",
                    "candidate boxes: .jsonl, Label Studio .json, or a YOLO predictions folder",
                    group="regions",
                ),
                Option(
                    "--proposals",
                    "detector: the regions are the proposal detector's boxes",
                    choices=("detector",),
                    group="regions",
                ),
                proposal_detector("with --proposals detector: "),
                Option("--threshold", "override the model's threshold (chosen on val)", type=float),
                Option("--batch-size", default=8, type=int),
                Option("--device", "cpu, cuda, cuda:1 ... (default: cuda when available)"),
                Option("--quiet", "no progress bar", switch=True),
            ),
            ("tracking.uri", *reads.PROPOSAL_KEYS),
            reads.PREDICT_CODE,
            fixed={"proposals": "detector", "quiet": True},
            cluster=Cluster("train", gpu=True),
        ),
        # a merged checkpoint of the registered version, its parity check tagged on the version
        Step(
            "export",
            "export",
            run.export,
            "Merge a model into a plain Hugging Face checkpoint (+ defectvlm.json) and prove it scores like "
            "base+adapter.",
            (
                registered_model("--model"),
                Output(
                    "exported",
                    "exports/candidate",
                    "the export folder",
                    artifact="Model",
                    metadata="defectvlm.json:parity",
                    cli="required",
                ),
            ),
            ("tracking.uri",),
            reads.EXPORT_CODE,
            cluster=Cluster("train", gpu=True, cache=False),
        ),
        # cluster only: the registered version's InferenceService (applied after `promote`)
        Step(
            "deploy",
            "deploy",
            run.deploy,
            "KServe InferenceService YAML for the registered version and its export (vLLM variant).",
            (
                registered_model("--model"),
                Input("exported", "export", "exported", option="--export-uri", uri=True),
                Output("deployment", "deploy", "output folder", artifact="Artifact"),
            ),
            reads.DEPLOY_KEYS,
            reads.DEPLOY_CODE,
            cluster=Cluster(cache=False),
            forms=("kfp",),
        ),
    )
}
