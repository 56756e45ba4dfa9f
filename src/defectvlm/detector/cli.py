"""The `train-detector` subcommand (registered by defectvlm.cli.build_parser)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def cmd_train_detector(args: argparse.Namespace, params) -> int:
    from defectvlm.detector.train import train_detector

    metrics = train_detector(params, Path(args.input), log=console.print)
    val = metrics["val"]
    console.print(
        f"detector: val mAP@0.5 {val['map50']}, recall at the budget {val['recall_at_budget']} "
        f"({val['proposals_per_image']} proposals/image), trained in {metrics['train_seconds']} s; "
        f"ONNX {metrics['onnx_images_per_second']} images/s "
        f"(parity: max relative difference {metrics['onnx_parity']['max_rel_diff']}); "
        f"{params.detector.output_dir}/"
    )
    if not args.no_tracking:
        from defectvlm.detector.tracking import log_and_register

        registered = log_and_register(params, Path(args.input), Path(params.detector.output_dir), metrics)
        console.print(f"registered as {registered['name']} v{registered['version']} (@{registered['alias']})")
    return 0


def add_commands(step, load) -> None:
    """Register with cli.build_parser's `step`; `load(args)` reads params.yaml plus -S overrides."""
    p = step(
        "train-detector",
        lambda args: cmd_train_detector(args, load(args)),
        "Train the cascade's proposal detector on the split's train/val (test never read): weights, ONNX "
        "export, val mAP@0.5 and recall at the proposal budget; logged to MLflow and registered as "
        "<registry.model_name>-detector.",
    )
    p.add_argument("--in", dest="input", default="data/02_split", help="folder with train.jsonl and val.jsonl")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow or register")
