"""`defectvlm <step>`: one subcommand per step. Each reads its inputs, calls the step's
function with parameters from params.yaml (plus `-S key=value` overrides), and writes
its outputs atomically. Exit codes: 0 ok, 1 the data (or a file, disk, server) breaks a rule,
2 bad parameters: a message names the file or setting and the fix; --debug adds the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from defectvlm.cluster.pipeline import add_arguments as add_pipeline_arguments
from defectvlm.config import ConfigError, Params, field_docs, load_params, params_from_dict, params_to_dict
from defectvlm.data.demo.items import DEFAULT_COUNT
from defectvlm.errors import StepFailure, explain
from defectvlm.io import write_json_atomic
from defectvlm.serve.run import add_arguments as add_serve_arguments
from defectvlm.serve.run import add_deploy_arguments
from defectvlm.step_types import Option, Output, Step, derived, dest, input_path
from defectvlm.steps import STEPS

console = Console(stderr=True, soft_wrap=True)
STAGE_TIMES_ENV = "DEFECTVLM_STAGE_TIMES"


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


def cmd_pipeline(args: argparse.Namespace) -> int:
    from defectvlm.cluster.pipeline import pipeline_command

    return pipeline_command(args, _load(args))


def cmd_promote(args: argparse.Namespace) -> int:
    from defectvlm.tracking.registry import promote

    params = _load(args)
    record = promote(params, args.alias, args.version, args.force, args.reason or "", Path(args.input))
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


def cmd_serve(args: argparse.Namespace) -> int:
    from defectvlm.serve.run import serve_command

    return serve_command(args, _load(args))


def cmd_deploy(args: argparse.Namespace) -> int:
    from defectvlm.serve.run import deploy_command

    return deploy_command(args, _load(args))


def add_step_commands(step, steps: dict[str, Step]) -> None:
    """`defectvlm <command>` for each declared step: options from its inputs, outputs and options."""
    for declared in {s.command: s for s in derived(steps, "cli").values()}.values():
        passed = [dest(a) for a in declared.arguments if (not a.sets if isinstance(a, Option) else a.option)]
        overrides = {dest(o): o.sets for o in declared.options if o.sets}
        p = step(declared.command, partial(_run_step, declared.function, passed, overrides), declared.help)
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for argument in declared.arguments:
            if isinstance(argument, Option):
                kwargs = {"action": "store_true"} if argument.switch else {"default": argument.default}
                if argument.choices:
                    kwargs["choices"] = argument.choices
                if argument.type:
                    kwargs["type"] = argument.type
                if argument.group and argument.group not in groups:
                    groups[argument.group] = p.add_mutually_exclusive_group()
                where = groups[argument.group] if argument.group else p
                where.add_argument(argument.flag, help=argument.help, required=argument.required, **kwargs)
            elif isinstance(argument, Output) and argument.option:
                default = argument.path if argument.cli == "default" else None
                required = argument.cli == "required"
                p.add_argument(
                    argument.option, dest=dest(argument), default=default, required=required, help=argument.help
                )
            elif argument.option:
                default = input_path(argument, steps) if argument.cli == "default" else None
                required = argument.cli == "required"
                p.add_argument(
                    argument.option, dest=dest(argument), default=default, required=required, help=argument.help
                )


def _run_step(function, passed: list[str], overrides: dict[str, str], args: argparse.Namespace) -> int:
    """Parameters (with an option that sets a key validated like -S), then the step's function; its time is
    printed (and recorded where DEFECTVLM_STAGE_TIMES names a file)."""
    args.set = [*(args.set or []), *(f"{key}={getattr(args, d)}" for d, key in overrides.items() if getattr(args, d))]
    start = time.perf_counter()
    code = function(_load(args), **{name: getattr(args, name) for name in passed})
    seconds = time.perf_counter() - start
    process_seconds = time.time() - psutil.Process().create_time()  # + interpreter start-up and imports
    name = args.command + (f" --phase {args.phase}" if getattr(args, "phase", None) else "")
    console.print(f"{name}: {seconds:.1f} s ({process_seconds:.1f} s since its process started)")
    if code == 0:
        record_stage_time(name, seconds, process_seconds)
    return code


def record_stage_time(step: str, seconds: float, process_seconds: float) -> None:
    """Append the step's time (and its process's, start-up included) as a JSON line to the file
    DEFECTVLM_STAGE_TIMES names, if it names one."""
    target = os.environ.get(STAGE_TIMES_ENV)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "seconds": round(seconds, 1), "process_seconds": round(process_seconds, 1)}
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


# calibration is imported by the two commands that use it, not at start-up: it is no step's code, so it
# stays out of every DVC stage's code deps (tests/pipeline/test_stage_reads.py)
def cmd_calibrate(args: argparse.Namespace) -> int:
    from defectvlm.calibration import calibrate, describe

    console.print(describe(calibrate()))
    return 0


def cmd_stage_times(args: argparse.Namespace) -> int:
    """The table `make demo` ends with: each step's time from the file, the total, the machine."""
    from defectvlm.calibration import calibrate, describe, read_stage_times

    rows = read_stage_times(Path(args.file))
    if not rows:
        console.print(f"no stage times in {args.file} (every stage was up to date, or none ran)")
        return 0
    table = Table("step", "seconds", "with its process's start-up", title=f"stage times ({args.file})")
    for step_name, seconds, process_seconds in rows:
        table.add_row(step_name, f"{seconds:.1f}", f"{process_seconds:.1f}")
    table.add_row("total", f"{sum(r[1] for r in rows):.1f}", f"{sum(r[2] for r in rows):.1f}")
    console.print(table)
    console.print(describe(calibrate()))
    return 0


def build_parser(steps: dict[str, Step] = STEPS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectvlm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, add the traceback (or DEFECTVLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def step(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        p.add_argument(
            "-S", "--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. -S ingest.workers=1"
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, add the traceback")
        p.set_defaults(func=func)
        return p

    step("params", cmd_params, "Show every parameter with its value and meaning.")

    p = sub.add_parser("demo-data", help="Write the synthetic demo dataset (deterministic).")
    p.add_argument("--out", default="data/raw", help="output folder (default: data/raw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-abnormal", type=int, default=DEFAULT_COUNT)
    p.add_argument("--n-normal", type=int, default=DEFAULT_COUNT)
    p.add_argument("--label-format", choices=("semicolon", "yolo", "labelstudio"), default="semicolon")
    p.add_argument("--workers", type=int, default=2, help="processes (output is identical for any number)")
    p.set_defaults(func=cmd_demo_data)

    add_step_commands(step, steps)

    p = sub.add_parser("calibrate", help="Time a fixed CPU workload (matmul + JPEG decode): compares machines.")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("stage-times", help="The table of step times a run recorded (DEFECTVLM_STAGE_TIMES).")
    p.add_argument("--file", default="reports/stage_times.jsonl", help="(default: reports/stage_times.jsonl)")
    p.set_defaults(func=cmd_stage_times)

    p = step(
        "pipeline",
        cmd_pipeline,
        "The Kubeflow pipeline: compile it to pipelines/finetune.yaml, run it here with kfp.local (run --local), "
        "or submit a run to a KFP server (submit --host URL).",
    )
    add_pipeline_arguments(p)

    p = step("promote", cmd_promote, "Move an alias (champion) to a version that passes the gates, beats the holder.")
    p.add_argument("--alias", default="champion")
    p.add_argument("--version", help="version to promote (default: the @candidate)")
    p.add_argument("--force", action="store_true", help="promote despite refusals (needs --reason; recorded)")
    p.add_argument("--reason", help="why (recorded in the registry's tags)")
    p.add_argument("--in", dest="input", default="data/04_sft", help="the SFT folder the version was tested on")

    p = step("reproduce", cmd_reproduce, "Re-run a recorded pipeline run from its commit and data version; compare.")
    p.add_argument("--run-id", required=True, help="the pipeline's MLflow run id (or any of its step runs)")
    p.add_argument("--workdir", help="where the fresh worktree goes (default: a temporary folder)")
    p.add_argument("--tolerance", type=float, help="max metric difference (default: registry.reproduce_tolerance)")
    p.add_argument("--out", help="write the comparison as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the worktree even when everything matches")

    p = step("serve", cmd_serve, "Serve the model over HTTP: inspection API, OpenAI chat, upload page, metrics.")
    add_serve_arguments(p)
    add_deploy_arguments(step("deploy", cmd_deploy, "KServe InferenceService YAML for a registered version."))
    return parser


def report_failure(exc: BaseException, params_values: Callable[[], dict], debug: bool, console) -> int | None:
    """What the CLI does with an exception a step raised: the step's open MLflow runs end as
    FAILED (KILLED on an interrupt); an error the user can fix is printed as one paragraph
    (with the traceback under --debug or DEFECTVLM_DEBUG=1) and its exit code returned;
    None means re-raise (a bug, or an interrupt)."""
    from defectvlm.tracking.mlflow_tracking import end_active_runs

    end_active_runs("FAILED" if isinstance(exc, Exception) else "KILLED")
    explained = explain(exc, params_values) if isinstance(exc, Exception) else None
    if explained is None:
        return None
    code, kind, message = explained
    if debug or os.environ.get("DEFECTVLM_DEBUG", "0") not in ("", "0"):
        console.print_exception()
    console.print(f"[red]{kind}[/]: {escape(message)}", highlight=False)  # a message's [..] is text, not markup
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BaseException as exc:
        code = report_failure(exc, lambda: params_to_dict(_load(args)), getattr(args, "debug", False), console)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
