"""`defectvlm <step>`: one subcommand per step. Each reads its inputs, calls the step's
function with parameters from params.yaml (plus `-S key=value` overrides), and writes
its outputs atomically. Exit codes: 0 ok, 1 the data breaks a rule, 2 bad parameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from defectvlm.cluster.pipeline import add_arguments as add_pipeline_arguments
from defectvlm.config import SPLITS, ConfigError, Params, field_docs, load_params, params_from_dict, params_to_dict
from defectvlm.errors import StepFailure
from defectvlm.io import read_jsonl, read_splits, write_json_atomic, write_jsonl_atomic, write_splits

console = Console(stderr=True, soft_wrap=True)


def _load(args: argparse.Namespace) -> Params:
    params = load_params(args.params)
    if not args.set:
        return params
    raw = params_to_dict(params)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"-S {item}: expected key=value")
        section = raw
        *parents, leaf = key.split(".")
        for part in parents:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(f"-S {key}: {part} is not a section")
        section[leaf] = yaml.safe_load(value)
    return params_from_dict(raw)


def cmd_params(args: argparse.Namespace) -> int:
    params = _load(args)
    table = Table("key", "value", "meaning", title=f"parameters ({args.params})")
    values = params_to_dict(params)
    for key, doc, _ in field_docs():
        value = values
        for part in key.split("."):
            value = value[part]
        table.add_row(key, repr(value), doc)
    Console().print(table)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from defectvlm.data.demo import generate_demo

    try:
        summary = generate_demo(
            Path(args.out),
            seed=args.seed,
            n_abnormal=args.n_abnormal,
            n_normal=args.n_normal,
            label_format=args.label_format,
            workers=args.workers,
        )
    except ValueError as exc:
        raise StepFailure(str(exc)) from None
    console.print(
        f"demo data in {args.out}: {summary.n_abnormal} abnormal, {summary.n_normal} normal images, "
        f"{summary.n_boxes} boxes ({summary.label_format} labels)"
    )
    return 0


def cmd_scan_labels(args: argparse.Namespace) -> int:
    from defectvlm.data.ingest import scan
    from defectvlm.data.label_stats import label_map_block, label_stats

    params = _load(args)
    stats = label_stats(scan(params), params)
    write_json_atomic(args.out, stats)
    table = Table("raw label", "boxes", "images", "maps to", title="raw labels")
    for raw, info in stats["raw_labels"].items():
        table.add_row(raw, str(info["boxes"]), str(info["images"]), str(info["maps_to"] or "?"))
    console.print(table)
    console.print(f"boxes per image: {stats['boxes_per_image']}")
    console.print(f"box width px: {stats['box_width_px']}  height px: {stats['box_height_px']}")
    for problem in stats["problems"]:
        console.print(f"[yellow]problem[/]: {problem}", markup=True, highlight=False)
    console.print(f"wrote {args.out}; paste this into params.yaml:")
    sys.stdout.write(label_map_block(stats))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from defectvlm.data.ingest import build_manifest, scan

    params = _load(args)
    out = Path(args.out)
    result = build_manifest(scan(params, progress=not args.quiet), params)
    write_jsonl_atomic(out / "manifest.jsonl", result.manifest)
    write_json_atomic(out / "ingest_report.json", result.report)
    _print_ingest_summary(result.report)
    for message in result.fatal:
        console.print(f"[red]error[/]: {message}", highlight=False)
    return 1 if result.fatal else 0


def cmd_split(args: argparse.Namespace) -> int:
    from defectvlm.data.split import split_manifest

    params = _load(args)
    result = split_manifest(read_jsonl(Path(args.input) / "manifest.jsonl"), params.split)
    out = Path(args.out)
    write_splits(out, result.splits)
    write_json_atomic(out / "split_report.json", result.report)
    table = Table("split", "images", "abnormal", "normal", "groups", "share", title="split")
    for name, counts in result.report["counts"].items():
        share = f"{result.report['ratios_achieved'][name]:.0%}"
        table.add_row(name, *(str(counts[k]) for k in ("images", "abnormal", "normal", "groups")), share)
    console.print(table)
    for warning in result.report["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    return 0


def cmd_regions(args: argparse.Namespace) -> int:
    from defectvlm.data.regions import build_regions

    params = _load(args)
    result = build_regions(read_splits(args.input, SPLITS), params.regions, params.model)
    out = Path(args.out)
    write_splits(out, result.splits)
    write_json_atomic(out / "regions_summary.json", result.summary)
    for name, counts in result.summary["splits"].items():
        console.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict)))
    return 0


def cmd_build_sft(args: argparse.Namespace) -> int:
    from defectvlm.data.exports import write_export
    from defectvlm.data.sft import build_sft, load_knowledge, load_templates

    if args.format:  # the same validation as -S sft.format=...
        args.set = [*(args.set or []), f"sft.format={args.format}"]
    params = _load(args)
    fmt = params.sft.format
    regions = read_splits(args.input, SPLITS)
    result = build_sft(regions, params.sft, load_templates(params.sft), load_knowledge(params.sft))
    out = Path(args.out)
    write_splits(out, result.splits)  # native, always: training and evaluation read these
    summary = {"format": fmt, **result.summary}
    if fmt != "native":
        summary["export"] = write_export(fmt, result, regions, params.model, out / fmt)
    write_json_atomic(out / "sft_summary.json", summary)
    for name, counts in result.summary["splits"].items():
        console.print(f"{name}: {counts['samples']} samples, tasks {counts['tasks']}, noised {counts['noised']}")
    if "export" in summary:
        console.print(f"{fmt} export in {out / fmt}; train with:\n{summary['export']['command']}", highlight=False)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from defectvlm.tracking.mlflow_tracking import MlflowTracking
    from defectvlm.train.loop import train_phase

    params = _load(args)
    tracking = None if args.no_tracking else MlflowTracking(params, Path(args.input))
    metrics = train_phase(params, args.phase, Path(args.input), resume=args.resume, tracking=tracking)
    if metrics.get("enabled"):
        console.print(
            f"phase {args.phase}: {metrics['steps']} steps, best {params.train.metric_for_best_model}="
            f"{metrics[params.train.metric_for_best_model]} at step {metrics['best_step']}, "
            f"token efficiency {metrics['token_efficiency']}"
        )
    else:
        console.print(f"phase {args.phase} is disabled in params.yaml: skipped")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectvlm.evaluate.run import evaluate

    params = _load(args)
    if args.cascade:
        from defectvlm.evaluate.cascade_cli import run_cascade

        return run_cascade(args, params)
    metrics = evaluate(
        params,
        args.run,
        Path(args.input),
        Path(args.out),
        split=args.split,
        mode=args.mode,
        baseline=not args.no_baseline,
    )
    table = Table("model", "level", "precision", "recall", "F1", "AUROC", title=f"{metrics['run']} on {args.split}")
    for title, result in (("fine-tuned", metrics[metrics["split"]]), ("base", metrics.get("baseline"))):
        for level in ("roi", "image") if result else ():
            m = result[level]
            table.add_row(title, level, str(m["precision"]), str(m["recall"]), str(m["f1"]), str(m["auroc"]))
    console.print(table)
    console.print(
        f"threshold {metrics[metrics['split']]['threshold']:.4f} (chosen on val); report: {args.out}/report.md"
    )
    if not args.no_tracking and metrics["run"] != "base":
        from defectvlm.tracking.mlflow_tracking import log_evaluation

        run_id = log_evaluation(params, Path(args.input), metrics, Path(args.out))
        console.print(f"logged to MLflow run {run_id} (nested under the pipeline's run)")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from defectvlm.cluster.pipeline import pipeline_command

    return pipeline_command(args, _load(args))


def cmd_register(args: argparse.Namespace) -> int:
    from defectvlm.evaluate.run import resolve_run
    from defectvlm.tracking.registry import CANDIDATE, register

    params = _load(args)
    best = resolve_run(params, args.run)
    if best is None:
        raise StepFailure("the untrained base is not registered: name a trained phase with --run")
    registration = register(params, best, Path(args.reports), Path(args.input))
    write_json_atomic(args.out, {**vars(registration), "alias": CANDIDATE})
    console.print(
        f"registered {best} as {registration.name} v{registration.version} (@{CANDIDATE}); "
        f"pipeline run {registration.pipeline_run_id}"
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from defectvlm.tracking.registry import promote

    params = _load(args)
    record = promote(params, args.alias, args.version, force=args.force, reason=args.reason or "")
    console.print(
        f"{params.registry.model_name} v{record['version']} is now @{args.alias} "
        + (f"(was v{record['previous']})" if record["previous"] else "(the first)")
        + (f"; FORCED past: {'; '.join(record['overridden'])}" if record["forced"] else "")
    )
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses
    import subprocess

    from defectvlm.tracking.reproduce import reproduce

    params = _load(args)
    result = reproduce(params, args.run_id, Path(args.workdir) if args.workdir else None, args.tolerance)
    table = Table("metric", "recorded", "reproduced", title=f"reproduction of {result.run_id} at {result.commit[:10]}")
    for key, pair in result.metrics.items():
        again = "-" if pair["reproduced"] is None else f"{pair['reproduced']:.4f}"
        table.add_row(key, f"{pair['recorded']:.4f}", again)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False)
    for problem in result.problems:
        console.print(f"[red]mismatch[/]: {problem}", highlight=False)
    if args.out:
        write_json_atomic(args.out, {**dataclasses.asdict(result), "ok": result.ok})
    if result.ok and not args.keep:
        subprocess.run(["git", "worktree", "remove", "--force", result.workdir], capture_output=True)
        console.print("reproduced: every compared figure is within tolerance")
    else:
        console.print(f"worktree kept for inspection: {result.workdir}")
    return 0 if result.ok else 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def step(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        p.add_argument(
            "-S", "--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. -S ingest.workers=1"
        )
        p.set_defaults(func=func)
        return p

    step("params", cmd_params, "Show every parameter with its value and meaning.")

    p = sub.add_parser("demo-data", help="Write the synthetic demo dataset (deterministic).")
    p.add_argument("--out", default="data/raw", help="output folder (default: data/raw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-abnormal", type=int, default=120)
    p.add_argument("--n-normal", type=int, default=120)
    p.add_argument("--label-format", choices=("semicolon", "yolo", "labelstudio"), default="semicolon")
    p.add_argument("--workers", type=int, default=2, help="processes (output is identical for any number)")
    p.set_defaults(func=cmd_demo_data)

    p = step("scan-labels", cmd_scan_labels, "Label distribution, box sizes, and a label_map block to paste.")
    p.add_argument("--out", default="data/label_stats.json", help="statistics file (default: data/label_stats.json)")

    p = step(
        "ingest", cmd_ingest, "Both image trees -> manifest.jsonl + ingest_report.json (every file accounted for)."
    )
    p.add_argument("--out", default="data/01_ingested", help="output folder (default: data/01_ingested)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = step("split", cmd_split, "manifest -> train/val/test by group, stable under data growth, no leakage.")
    p.add_argument("--in", dest="input", default="data/01_ingested", help="folder with manifest.jsonl")
    p.add_argument("--out", default="data/02_split", help="output folder (default: data/02_split)")

    p = step("regions", cmd_regions, "splits -> ROI candidates with negatives and decoys, in the model's frame.")
    p.add_argument("--in", dest="input", default="data/02_split", help="folder with the split files")
    p.add_argument("--out", default="data/03_regions", help="output folder (default: data/03_regions)")

    p = step("build-sft", cmd_build_sft, "regions -> SFT conversations (native; ms-swift/LLaMA-Factory/YOLO export).")
    p.add_argument("--in", dest="input", default="data/03_regions", help="folder with the region files")
    p.add_argument("--out", default="data/04_sft", help="output folder (default: data/04_sft)")
    p.add_argument("--format", choices=("native", "swift", "llamafactory", "yolo"), help="sets sft.format")

    p = step(
        "train",
        cmd_train,
        "Train one phase (1: projector + LM LoRA, 2: + top vision LoRA, 3: + top vision blocks) with DeepSpeed. "
        "Several processes: torchrun --nproc_per_node N -m defectvlm train --phase 1",
    )
    p.add_argument("--phase", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--in", dest="input", default="data/04_sft", help="folder with native SFT files")
    p.add_argument("--resume", action="store_true", help="continue from the phase's last checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p = step("evaluate", cmd_evaluate, "ROI- and image-level metrics, threshold from val, plots and a report.")
    p.add_argument("--run", default="last", help="runs/phaseN, 'last' (last enabled phase) or 'base' (untrained)")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--mode", default="score", choices=("score", "generate"), help="teacher-forced scores or free text")
    p.add_argument("--in", dest="input", default="data/04_sft", help="folder with native SFT files")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.add_argument("--no-baseline", action="store_true", help="skip evaluating the untrained base")
    p.add_argument("--no-tracking", action="store_true", help="do not log to the phase's MLflow run")
    p.add_argument("--cascade", action="store_true", help="detector alone vs detector + VLM on test (into OUT/cascade)")
    p.add_argument("--detector", help="--cascade: models:/..., a train-detector folder or an ONNX file")
    p.add_argument("--split-dir", default="data/02_split", help="--cascade: the split files (boxes of val and test)")

    p = step(
        "pipeline",
        cmd_pipeline,
        "The Kubeflow pipeline: compile it to pipelines/finetune.yaml, run it here with kfp.local (run --local), "
        "or submit a run to a KFP server (submit --host URL).",
    )
    add_pipeline_arguments(p)

    p = step("register", cmd_register, "Register the evaluated adapter as a new model version (alias candidate).")
    p.add_argument("--run", default="last", help="runs/phaseN or 'last' (the last enabled phase)")
    p.add_argument("--reports", default="reports", help="the evaluation of that run (metrics.json, inference.json)")
    p.add_argument("--in", dest="input", default="data/04_sft", help="folder with the SFT splits (lineage digests)")
    p.add_argument("--out", default="reports/registration.json", help="where the registered name/version are written")

    p = step("promote", cmd_promote, "Move an alias (champion) to a version that passes the gates, beats the holder.")
    p.add_argument("--alias", default="champion")
    p.add_argument("--version", help="version to promote (default: the @candidate)")
    p.add_argument("--force", action="store_true", help="promote despite refusals (needs --reason; recorded)")
    p.add_argument("--reason", help="why (recorded in the registry's tags)")

    p = step("reproduce", cmd_reproduce, "Re-run a recorded pipeline run from its commit and data version; compare.")
    p.add_argument("--run-id", required=True, help="the pipeline's MLflow run id (or any of its step runs)")
    p.add_argument("--workdir", help="where the fresh worktree goes (default: a temporary folder)")
    p.add_argument("--tolerance", type=float, help="max metric difference (default: registry.reproduce_tolerance)")
    p.add_argument("--out", help="write the comparison as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the worktree even when everything matches")

    from defectvlm.detector.cli import add_commands as add_detector_commands
    from defectvlm.inference.cli import add_commands

    add_commands(step)
    add_detector_commands(step, _load)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        console.print(f"[red]parameter error[/]: {exc}", highlight=False)
        return 2
    except StepFailure as exc:
        console.print(f"[red]error[/]: {exc}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
