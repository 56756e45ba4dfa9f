"""`defectvlm pipeline compile | run --local | submit`: the KFP pipeline built from the step table
(`defectvlm.cluster.dag`) and the same params file (and `-S` overrides) as every other command.
`pipeline dvc` writes dvc.yaml from the step table."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

from rich.console import Console

from defectvlm.config import Params, params_to_dict
from defectvlm.dvc_stages import dvc_yaml
from defectvlm.errors import StepFailure
from defectvlm.tracking.lineage import lineage_paths

PACKAGE = Path("pipelines/finetune.yaml")
DVC_FILE = Path("dvc.yaml")
TOKEN_ENV = "KF_PIPELINES_TOKEN"
console = Console(stderr=True, soft_wrap=True)


def compile_pipeline(params: Params, out: Path = PACKAGE) -> Path:
    from kfp import compiler

    from defectvlm.cluster.dag import build

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params), str(out))
    out.write_text(_sorted_header_defaults(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


_HEADER_DEFAULT = re.compile(r"^(#    \w+: dict \[Default: )(.*)(\])$", re.MULTILINE)


def _sorted_header_defaults(text: str) -> str:
    """KFP's comment header prints dict defaults in protobuf map order, which changes from run to
    run; sorted keys make the compiled file reproducible."""

    def ordered(value):
        return {k: ordered(value[k]) for k in sorted(value)} if isinstance(value, dict) else value

    return _HEADER_DEFAULT.sub(lambda m: m[1] + str(ordered(ast.literal_eval(m[2]))) + m[3], text)


def arguments(params: Params, data_version: str) -> dict:
    """Run arguments: every runtime section of params, the data version and its lineage files."""
    from defectvlm.cluster.dag import RUNTIME_SECTIONS

    values = params_to_dict(params)
    sections = {name: values[name] for name in RUNTIME_SECTIONS}
    return {**sections, "data_version": data_version, "lineage": lineage_at(params, data_version)}


def lineage_at(params: Params, revision: str) -> dict[str, str]:
    """dvc.lock and the raw .dvc files as of `revision` in git (as in the working tree where
    the revision is not a commit of this checkout): what the cluster run logs as its data version."""
    files = {}
    for path in lineage_paths(params):
        shown = revision and subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
        if shown and shown.returncode == 0:
            files[path] = shown.stdout
        elif Path(path).is_file():
            files[path] = Path(path).read_text(encoding="utf-8")
    return files


def default_data_version() -> str:
    """The checked-out commit: its dvc.lock / .dvc files pin the data version."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def run_local(params: Params, root: Path, data_version: str) -> dict:
    """The whole DAG in this environment with kfp.local's SubprocessRunner; returns registration.json.

    The workspace (checkpoints) is root/workspace and the KFP artifacts go to root/outputs."""
    from kfp import local

    from defectvlm.cluster.dag import build

    root = root.resolve()
    cluster = params.cluster.model_copy(update={"workspace": str(root / "workspace"), "workspace_pvc": ""})
    params = params.model_copy(update={"cluster": cluster})
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "outputs"))
    pipeline = build(params)
    with warnings.catch_warnings():
        # the project's images do not contain "python" in their name; here they are this venv anyway
        warnings.filterwarnings("ignore", message="You may be attemping", category=RuntimeWarning)
        try:
            task = pipeline(**arguments(params, data_version))
        except RuntimeError as exc:
            raise StepFailure(f"local pipeline run failed: {exc}") from None
    return json.loads((Path(task.output.path) / "registration.json").read_text(encoding="utf-8"))


def submit(params: Params, host: str, experiment: str, data_version: str, run_name: str | None = None) -> str:
    """Compile with params and start a run on the KFP server at host; returns the run's URL.

    The bearer token comes from $KF_PIPELINES_TOKEN (none: an unauthenticated or port-forwarded server)."""
    import kfp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works with", category=FutureWarning)
        client = kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "finetune.yaml")
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments(params, data_version),
            run_name=run_name,
            experiment_name=experiment,
            service_account=params.cluster.service_account or None,
        )
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("compile", "run", "submit", "dvc"))
    parser.add_argument("--out", type=Path, default=PACKAGE, help=f"compile: package path (default: {PACKAGE})")
    parser.add_argument("--local", action="store_true", help="run: with kfp.local here (the only way `run` runs)")
    parser.add_argument("--root", type=Path, default=Path(".kfp_local"), help="run: outputs and workspace folder")
    parser.add_argument("--host", help="submit: KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    parser.add_argument("--experiment", default="defectvlm", help="submit: KFP experiment (default: defectvlm)")
    parser.add_argument("--run-name", help="submit: run name (default: KFP's)")
    parser.add_argument("--data-version", help="data revision the data steps are cached by (default: git HEAD)")


def pipeline_command(args: argparse.Namespace, params: Params) -> int:
    data_version = args.data_version if args.data_version is not None else default_data_version()
    if args.action == "compile":
        console.print(f"wrote {compile_pipeline(params, args.out)}")
    elif args.action == "dvc":
        DVC_FILE.write_text(dvc_yaml(), encoding="utf-8")
        console.print(f"wrote {DVC_FILE}")
    elif args.action == "run":
        if not args.local:
            console.print("[red]error[/]: `pipeline run` needs --local (use `pipeline submit` for a cluster)")
            return 2
        registration = run_local(params, args.root, data_version)
        console.print(f"registered: {json.dumps(registration, ensure_ascii=False)}")
    else:
        if not args.host:
            console.print("[red]error[/]: `pipeline submit` needs --host")
            return 2
        print(submit(params, args.host, args.experiment, data_version, args.run_name))
    return 0
