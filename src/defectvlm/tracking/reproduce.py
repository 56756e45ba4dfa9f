"""`defectvlm reproduce --run-id ID`: re-derive a recorded run from its code and data version.

A fresh git worktree at the run's commit receives the run's recorded dvc.lock, .dvc files
and resolved parameters; `dvc checkout` (or `dvc pull` from the remote) restores the data;
DVC checks the restored raw folders against the recorded digests; `dvc repro --force
evaluate` re-runs every step with the commit's own code; the re-derived SFT digests and
test metrics are compared with the recorded ones."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from defectvlm.config import Params, params_from_dict
from defectvlm.errors import StepFailure
from defectvlm.tracking.lineage import split_digests
from defectvlm.tracking.mlflow_tracking import LINEAGE_FILE, PIPELINE_KEY_TAG, STEP_TAG, connect, evaluation_metrics

COMPARED = ("test.roi.precision", "test.roi.recall", "test.roi.f1", "test.image.f1", "test.image.auroc", "threshold")


@dataclass
class Reproduction:
    run_id: str
    commit: str
    workdir: str
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def reproduce(params: Params, run_id: str, workdir: Path | None = None, tolerance: float | None = None) -> Reproduction:
    mlflow = connect(params)
    client = mlflow.MlflowClient()
    parent = _pipeline_run(client, run_id)
    tags = parent.data.tags
    if "git.commit" not in tags:
        raise StepFailure(f"run {parent.info.run_id} records no git commit: it cannot be reproduced")
    raw = _json(client, parent.info.run_id, "params.resolved.json")
    recorded_params = params_from_dict(raw)
    lineage = _json(client, parent.info.run_id, LINEAGE_FILE)
    evaluation = _child(client, parent, "evaluate")
    tolerance = recorded_params.registry.reproduce_tolerance if tolerance is None else tolerance

    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"reproduce-{parent.info.run_id[:8]}-"))
    result = Reproduction(parent.info.run_id, tags["git.commit"], str(workdir))
    if tags.get("git.dirty") == "true":
        result.notes.append("the run was made from a tree with uncommitted changes: the commit's code is used")
    _git(["worktree", "add", "--detach", str(workdir), tags["git.commit"]], Path("."))

    # the recorded data version and parameters; results go to a separate experiment, never to the registry
    for path, text in lineage.items():
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text(text, encoding="utf-8")
    raw["tracking"]["experiment"] = f"{recorded_params.tracking.experiment}-reproduce"
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    _share_dvc_storage(workdir)

    env = {"PYTHONPATH": str(workdir / "src")}  # the commit's code, not this checkout's
    dvc_files = [p for p in lineage if p.endswith(".dvc")]
    restored = _run(["dvc", "checkout", "--relink", *dvc_files], workdir, env)
    if restored.returncode != 0:
        pulled = _run(["dvc", "pull", *dvc_files], workdir, env)
        if pulled.returncode != 0:
            raise StepFailure(f"cannot restore the data version: {pulled.stderr.strip() or pulled.stdout.strip()}")
    status = _run(["dvc", "status", "--json", *dvc_files], workdir, env)
    changed = json.loads(status.stdout or "{}") if status.returncode == 0 else {"dvc status": status.stderr}
    if changed:
        result.problems.append(f"the restored raw data differ from the recorded version: {json.dumps(changed)}")
        return result

    repro = _run(["dvc", "repro", "--force", "evaluate"], workdir, env)
    if repro.returncode != 0:
        result.problems.append(f"the pipeline failed: {(repro.stderr or repro.stdout).strip()[-2000:]}")
        return result

    for split, md5 in split_digests(workdir / "data" / "04_sft").items():
        if tags.get(f"data.sft.{split}.md5") not in (None, md5):
            result.problems.append(
                f"sft {split} digest {md5} differs from the recorded {tags[f'data.sft.{split}.md5']}"
            )
    derived = json.loads((workdir / "reports" / "metrics.json").read_text(encoding="utf-8"))
    again = evaluation_metrics(derived)
    for key in COMPARED:
        before, after = evaluation.data.metrics.get(key), again.get(key)
        if before is None:
            continue
        result.metrics[key] = {"recorded": before, "reproduced": after}
        if after is None or not math.isclose(before, after, abs_tol=tolerance):
            result.problems.append(f"{key}: recorded {before:.4f}, reproduced {after} (tolerance {tolerance})")
    return result


def _pipeline_run(client, run_id: str):
    """The pipeline (parent) run of `run_id`, which may be the parent itself or any step's run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise StepFailure(f"run {run_id} not found in the tracking store ({exc.message})") from None
    if run.data.tags.get(STEP_TAG) != "pipeline" and "mlflow.parentRunId" in run.data.tags:
        run = client.get_run(run.data.tags["mlflow.parentRunId"])
    if PIPELINE_KEY_TAG not in run.data.tags:
        raise StepFailure(f"run {run_id} is not a defectvlm pipeline run")
    return run


def _child(client, parent, step: str):
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{STEP_TAG}` = '{step}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not children:
        raise StepFailure(f"pipeline run {parent.info.run_id} has no {step} run: nothing to compare with")
    return children[0]


def _json(client, run_id: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the lineage is missing
            raise StepFailure(f"run {run_id} has no {path} artifact: {exc}") from None
        return json.loads(Path(local).read_text(encoding="utf-8"))


def _share_dvc_storage(workdir: Path) -> None:
    """The worktree reads this repository's DVC cache, and local remotes by their absolute path."""
    here = Path(".").resolve()
    _run(["dvc", "cache", "dir", "--local", str(here / ".dvc" / "cache")], workdir)
    listed = _run(["dvc", "remote", "list"], here)
    for line in listed.stdout.splitlines():
        name, _, url = line.partition("\t")
        url = url.strip()
        if url and "://" not in url and not Path(url).is_absolute():
            _run(
                ["dvc", "remote", "modify", "--local", name.strip(), "url", str((here / ".dvc" / url).resolve())],
                workdir,
            )


def _git(args: list[str], cwd: Path) -> None:
    done = _run(["git", *args], cwd)
    if done.returncode != 0:
        raise StepFailure(f"git {' '.join(args)}: {done.stderr.strip()}")


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a tool of this environment (dvc, defectvlm come from the same bin/ as this Python)."""
    full = dict(os.environ, **(env or {}))
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True)
