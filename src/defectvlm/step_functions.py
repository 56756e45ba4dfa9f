"""The pipeline steps' functions: each reads its inputs, calls the library with the parsed
parameters, writes its outputs atomically and prints a short summary. The CLI, the DVC stages
(through the CLI) and the KFP tasks (in-process) all call these, as declared in
`defectvlm.steps`. Return value: the exit code (0 ok, 1 the data breaks a rule)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from defectvlm.config import SPLITS, Params
from defectvlm.errors import StepFailure
from defectvlm.io import (
    read_json_file,
    read_jsonl,
    read_splits,
    write_json_atomic,
    write_jsonl_atomic,
    write_splits,
)

console = Console(stderr=True, soft_wrap=True)


def scan_labels(params: Params, out: str) -> int:
    from defectvlm.data.ingest import scan
    from defectvlm.data.label_stats import label_map_block, label_stats

    stats = label_stats(scan(params), params)
    write_json_atomic(out, stats)
    table = Table("raw label", "boxes", "images", "maps to", title="raw labels")
    for raw, info in stats["raw_labels"].items():
        table.add_row(raw, str(info["boxes"]), str(info["images"]), str(info["maps_to"] or "?"))
    console.print(table)
    console.print(f"boxes per image: {stats['boxes_per_image']}")
    console.print(f"box width px: {stats['box_width_px']}  height px: {stats['box_height_px']}")
    for problem in stats["problems"]:
        console.print(f"[yellow]problem[/]: {problem}", markup=True, highlight=False)
    console.print(f"wrote {out}; paste this into params.yaml:")
    sys.stdout.write(label_map_block(stats))
    return 0


def ingest(params: Params, out: str, quiet: bool = False) -> int:
    from defectvlm.data.ingest import build_manifest, scan

    result = build_manifest(scan(params, progress=not quiet), params)
    write_jsonl_atomic(Path(out) / "manifest.jsonl", result.manifest)
    write_json_atomic(Path(out) / "ingest_report.json", result.report)
    _print_ingest_summary(result.report)
    for message in result.fatal:
        console.print(f"[red]error[/]: {message}", highlight=False)
    return 1 if result.fatal else 0


def _print_ingest_summary(report: dict) -> None:
    table = Table("kind", "accepted", "repaired", "rejected", title="ingest")
    for kind, counts in report["counts_by_kind"].items():
        table.add_row(kind, *(str(counts[s]) for s in ("accepted", "repaired", "rejected")))
    c = report["counts"]
    table.add_row("all files", str(c["accepted"]), str(c["repaired"]), str(c["rejected"]), style="bold")
    console.print(table)
    images = report["images"]
    console.print(
        f"manifest: {images['in_manifest']} images ({images['abnormal']} abnormal, {images['normal']} normal), "
        f"{images['boxes']} boxes {images['boxes_per_class']}"
    )
    if report["reasons"]:
        console.print("reasons: " + ", ".join(f"{k}={v}" for k, v in report["reasons"].items()))


def split(params: Params, input: str, out: str) -> int:
    from defectvlm.data.split import split_manifest

    result = split_manifest(read_jsonl(Path(input) / "manifest.jsonl"), params.split)
    write_splits(Path(out), result.splits)
    write_json_atomic(Path(out) / "split_report.json", result.report)
    table = Table("split", "images", "abnormal", "normal", "groups", "share", title="split")
    for name, counts in result.report["counts"].items():
        share = f"{result.report['ratios_achieved'][name]:.0%}"
        table.add_row(name, *(str(counts[k]) for k in ("images", "abnormal", "normal", "groups")), share)
    console.print(table)
    for warning in result.report["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    return 0


def regions(params: Params, input: str, out: str) -> int:
    from defectvlm.data.regions import build_regions

    result = build_regions(read_splits(input, SPLITS), params.regions, params.model, params.detector, console.print)
    write_splits(Path(out), result.splits)
    write_json_atomic(Path(out) / "regions_summary.json", result.summary)
    for name, counts in result.summary["splits"].items():
        console.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict)))
    return 0


def build_sft(params: Params, input: str, out: str) -> int:
    from defectvlm.data.exports import write_export
    from defectvlm.data.sft import build_sft as build
    from defectvlm.data.sft import load_knowledge, load_templates

    fmt = params.sft.format
    regions = read_splits(input, SPLITS)
    result = build(regions, params.sft, load_templates(params.sft), load_knowledge(params.sft))
    write_splits(Path(out), result.splits)  # native, always: training and evaluation read these
    summary = {"format": fmt, **result.summary}
    if fmt != "native":
        summary["export"] = write_export(fmt, result, regions, params.model, Path(out) / fmt)
    write_json_atomic(Path(out) / "sft_summary.json", summary)
    for name, counts in result.summary["splits"].items():
        console.print(f"{name}: {counts['samples']} samples, tasks {counts['tasks']}, noised {counts['noised']}")
    if "export" in summary:
        console.print(
            f"{fmt} export in {Path(out) / fmt}; train with:\n{summary['export']['command']}", highlight=False
        )
    return 0


def train(params: Params, phase: int, input: str, resume: bool = False, no_tracking: bool = False) -> int:
    from defectvlm.tracking.mlflow_tracking import MlflowTracking
    from defectvlm.train.loop import fit_phase

    tracking = None if no_tracking else MlflowTracking(params, Path(input))
    metrics = fit_phase(params, phase, Path(input), resume=resume, tracking=tracking)
    if metrics.get("enabled"):
        console.print(
            f"phase {phase}: {metrics['steps']} steps, best {params.train.metric_for_best_model}="
            f"{metrics[params.train.metric_for_best_model]} at step {metrics['best_step']}, "
            f"token efficiency {metrics['token_efficiency']}"
        )
    else:
        console.print(f"phase {phase} is disabled in params.yaml: skipped")
    return 0


def evaluate(
    params: Params,
    run: str,
    input: str,
    out: str,
    split: str = "test",
    mode: str = "score",
    no_baseline: bool = False,
    no_tracking: bool = False,
) -> int:
    from defectvlm.evaluate.run import evaluate as evaluate_run

    metrics = evaluate_run(params, run, Path(input), Path(out), split=split, mode=mode, baseline=not no_baseline)
    table = Table("model", "level", "precision", "recall", "F1", "AUROC", title=f"{metrics['run']} on {split}")
    for title, result in (("fine-tuned", metrics[metrics["split"]]), ("base", metrics.get("baseline"))):
        for level in ("roi", "image") if result else ():
            m = result[level]
            table.add_row(title, level, str(m["precision"]), str(m["recall"]), str(m["f1"]), str(m["auroc"]))
    console.print(table)
    console.print(f"threshold {metrics[metrics['split']]['threshold']:.4f} (chosen on val); report: {out}/report.md")
    if not no_tracking and metrics["run"] != "base":
        from defectvlm.tracking.mlflow_tracking import log_evaluation

        run_id = log_evaluation(params, Path(input), metrics, Path(out))
        console.print(f"logged to MLflow run {run_id} (nested under the pipeline's run)")
    return 0


def evaluate_cascade(params: Params, run: str, input: str, out: str, detector: str | None = None) -> int:
    from defectvlm.evaluate.cascade_cli import run_cascade

    return run_cascade(params, run, detector, input, out)


def train_detector(params: Params, input: str, no_tracking: bool = False) -> int:
    from defectvlm.detector.train import train_detector as train

    metrics = train(params, Path(input), log=console.print)
    val = metrics["val"]
    console.print(
        f"detector: val mAP@0.5 {val['map50']}, recall at the budget {val['recall_at_budget']} "
        f"({val['proposals_per_image']} proposals/image), trained in {metrics['train_seconds']} s; "
        f"ONNX {metrics['onnx_images_per_second']} images/s "
        f"(parity: max relative difference {metrics['onnx_parity']['max_rel_diff']}); "
        f"{params.detector.output_dir}/"
    )
    if not no_tracking:
        from defectvlm.detector.tracking import log_and_register

        registered = log_and_register(params, Path(input), Path(params.detector.output_dir), metrics)
        console.print(f"registered as {registered['name']} v{registered['version']} (@{registered['alias']})")
    return 0


def register(params: Params, run: str, reports: str, input: str, out: str) -> int:
    from defectvlm.evaluate.run import resolve_run
    from defectvlm.tracking.registry import CANDIDATE
    from defectvlm.tracking.registry import register as register_run

    best = resolve_run(params, run)
    if best is None:
        raise StepFailure("the untrained base is not registered: name a trained phase with --run")
    registration = register_run(params, best, Path(reports), Path(input))
    moved = registration.candidate == str(registration.version)
    write_json_atomic(out, {**vars(registration), "alias": CANDIDATE if moved else None})
    where = f"@{CANDIDATE}" if moved else f"@{CANDIDATE} stays on v{registration.candidate}, from a later pipeline run"
    console.print(
        f"registered {best} as {registration.name} v{registration.version} ({where}); "
        f"pipeline run {registration.pipeline_run_id}"
    )
    return 0


def model_uri(params: Params, model: str) -> tuple[str, str | None]:
    """(model URI, tracking URI) of --model: `@alias` is short for models:/<registry.model_name>@alias,
    and a registration record (`register`'s registration.json, or the folder holding it) names
    the exact version it registered; a run or export folder is itself."""
    record = Path(model) / "registration.json" if Path(model).is_dir() else Path(model)
    if record.name == "registration.json" and record.is_file():
        registered = read_json_file(record)
        if not isinstance(registered, dict) or not {"name", "version"} <= set(registered):
            raise StepFailure(f"{record}: not a registration record (no name and version): run `defectvlm register`")
        return f"models:/{registered['name']}/{registered['version']}", params.tracking.uri
    if model.startswith("@"):
        return f"models:/{params.registry.model_name}{model}", params.tracking.uri
    return model, params.tracking.uri if model.startswith("models:/") else None


def predict(
    params: Params,
    model: str,
    images: str,
    out: str,
    regions: str | None = None,
    proposals: str | None = None,
    detector: str | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    quiet: bool = False,
) -> int:
    from defectvlm.inference.loading import load_model
    from defectvlm.inference.predict import predict_images
    from defectvlm.inference.report import write_predictions
    from defectvlm.inference.sources import find_images, region_source

    uri, tracking_uri = model_uri(params, model)
    source = region_source(regions, proposals, detector, params)
    found = find_images(images)
    loaded = load_model(uri, device=device, tracking_uri=tracking_uri)
    threshold = threshold if threshold is not None else loaded.config.threshold
    if threshold is None:
        raise StepFailure(f"{model} has no threshold (no inference.json): evaluate it or pass --threshold")
    records = predict_images(loaded, found, source, threshold, batch_size, sys.stderr.isatty() and not quiet)
    counts = write_predictions(records, loaded.config.classes, Path(out))
    console.print(
        f"{counts['images']} images: {counts['abnormal']} abnormal, {counts['normal']} normal, "
        f"{counts['unreadable']} unreadable; {out}/predictions.jsonl, predictions.csv, report.html"
    )
    return 0


def export(params: Params, model: str, out: str) -> int:
    from defectvlm.inference.export import export as export_model

    uri, tracking_uri = model_uri(params, model)
    result = export_model(uri, Path(out), tracking_uri=tracking_uri)
    verdict = "passed" if result["passed"] else "FAILED"
    console.print(
        f"exported {uri} to {out}; parity {verdict}: max |dP(abnormal)| = {result['max_abs_diff']:.2e} "
        f"over {result['regions']} regions (tolerance {result['tolerance']})"
    )
    return 0 if result["passed"] else 1


def deploy(params: Params, model: str, out: str, export_uri: str | None = None) -> int:
    from defectvlm.serve.deploy import render

    uri, _ = model_uri(params, model)
    for path in render(params, uri, Path(out), export_uri):
        console.print(f"wrote {path}")
    return 0
