"""The `predict` and `export` subcommands (registered by defectvlm.cli.build_parser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from defectvlm.errors import StepFailure

console = Console(stderr=True, soft_wrap=True)


def cmd_predict(args: argparse.Namespace) -> int:
    from defectvlm.inference.loading import load_model
    from defectvlm.inference.predict import predict_images
    from defectvlm.inference.report import write_predictions
    from defectvlm.inference.sources import find_images, region_source

    source = region_source(args.regions, args.proposals, args.detector, args.params)
    images = find_images(args.images)
    uri, tracking_uri = _model(args)
    loaded = load_model(uri, device=args.device, tracking_uri=tracking_uri)
    threshold = args.threshold if args.threshold is not None else loaded.config.threshold
    if threshold is None:
        raise StepFailure(f"{args.model} has no threshold (no inference.json): evaluate it or pass --threshold")
    progress = sys.stderr.isatty() and not args.quiet
    records = predict_images(loaded, images, source, threshold, args.batch_size, progress)
    counts = write_predictions(records, loaded.config.classes, Path(args.out))
    console.print(
        f"{counts['images']} images: {counts['abnormal']} abnormal, {counts['normal']} normal, "
        f"{counts['unreadable']} unreadable; {args.out}/predictions.jsonl, predictions.csv, report.html"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from defectvlm.inference.export import export

    uri, tracking_uri = _model(args)
    result = export(uri, Path(args.out), tracking_uri=tracking_uri)
    verdict = "passed" if result["passed"] else "FAILED"
    console.print(
        f"exported {uri} to {args.out}; parity {verdict}: max |dP(abnormal)| = {result['max_abs_diff']:.2e} "
        f"over {result['regions']} regions (tolerance {result['tolerance']})"
    )
    return 0 if result["passed"] else 1


def _model(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model URI, tracking URI): `@alias` is short for models:/<registry.model_name>@alias."""
    if not args.model.startswith(("models:/", "@")):
        return args.model, None
    if not Path(args.params).exists():
        if args.model.startswith("@"):
            raise StepFailure(f"--model {args.model}: the registered model's name comes from {args.params}, not found")
        return args.model, None
    from defectvlm.config import load_params

    params = load_params(args.params)
    uri = f"models:/{params.registry.model_name}{args.model}" if args.model.startswith("@") else args.model
    return uri, params.tracking.uri


def add_commands(step) -> None:
    """Register the subcommands with cli.build_parser's `step` (which adds --params and -S)."""
    p = step(
        "predict",
        cmd_predict,
        "Run a model on new images: predictions.jsonl, predictions.csv and report.html. Regions from --regions "
        "(boxes .jsonl, a folder of YOLO prediction .txt files, or a Label Studio .json export); "
        "without it, a grid of windows the size of the median training defect.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="models:/<name>@<alias>, models:/<name>/<version>, @<alias> (registry.model_name), a run or export",
    )
    p.add_argument("--images", required=True, help="a folder (recursive), a glob, or a manifest (.jsonl or .txt)")
    p.add_argument("--out", default="reports/predict", help="output folder (default: reports/predict)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--regions", help="candidate boxes: .jsonl, Label Studio .json, or a YOLO predictions folder")
    where.add_argument(
        "--proposals", choices=("detector",), help="detector: the regions are the proposal detector's boxes"
    )
    p.add_argument(
        "--detector",
        help="with --proposals detector: models:/<name>@<alias>, a train-detector folder, or an ONNX file "
        "(ours or an Ultralytics YOLO export); default: models:/<registry.model_name>-detector@candidate",
    )
    p.add_argument("--threshold", type=float, help="override the model's threshold (chosen on val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = step(
        "export",
        cmd_export,
        "Merge a model into a plain Hugging Face checkpoint (+ defectvlm.json) and prove it scores like base+adapter.",
    )
    p.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, @<alias> or a run folder"
    )
    p.add_argument("--out", required=True, help="the export folder")
