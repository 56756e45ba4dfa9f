"""The model registry (MLflow aliases, not the deprecated stages).

`register` adds the evaluated adapter as a new version of `registry.model_name`: the
adapter files only (the base model is recorded by id or path, never copied), its inference
config (threshold chosen on val), test metrics, data digests and git commit as version tags,
and points the `candidate` alias at it. `promote` moves an alias (e.g. `champion`) to a
version when it passes `registry.gates` and matches or beats the current holder on the same
test set; every move is recorded in the version's and the model's tags."""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from defectvlm.config import Params
from defectvlm.errors import StepFailure
from defectvlm.tracking.lineage import split_digests
from defectvlm.tracking.mlflow_tracking import connect, evaluation_metrics, parent_run_id, step_run

CANDIDATE = "candidate"
ADAPTER_PATH = "adapter"
TEST_DIGEST_TAG = "data.sft.test.md5"
METRIC_TAG = "metric."  # + "test.roi.f1", ...
HISTORY_LIMIT = 4000  # characters kept in a model's promotion-history tag


class PromotionRefused(StepFailure):
    """The challenger does not qualify; the message lists every reason."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    pipeline_run_id: str
    source: str


def register(params: Params, best: Path, reports: Path, sft_dir: Path) -> Registration:
    """Register `best` (a phase's best/ folder) with the evaluation in `reports`."""
    from mlflow.exceptions import MlflowException

    metrics = _read_json(reports / "metrics.json")
    inference = _read_json(reports / "inference.json")
    if Path(metrics["run"]) != best.parent:
        raise StepFailure(f"{reports}/metrics.json evaluates {metrics['run']}, not {best.parent}: run evaluate first")
    if metrics["split"] != "test":
        raise StepFailure(f"{reports}/metrics.json holds {metrics['split']} metrics: register needs the test split's")
    phase = _read_json(best / "phase.json")
    digests = split_digests(sft_dir)
    if "test" not in digests:
        raise StepFailure(f"{sft_dir}/test.jsonl not found: the registered version must name its test set")
    tags = {
        "base_model": phase["base"],
        "family": phase["family"],
        "phase": str(phase["phase"]),
        "threshold": str(inference["threshold"]),
        **{f"{METRIC_TAG}{k}": str(v) for k, v in evaluation_metrics(metrics).items() if k.startswith("test.")},
        **{f"data.sft.{split}.md5": md5 for split, md5 in digests.items()},
    }
    mlflow = connect(params)
    client = mlflow.MlflowClient()
    with step_run(params, sft_dir, "register", ("test",)) as run:
        run_id = run.info.run_id
        tags.update({k: v for k, v in run.data.tags.items() if k.startswith(("git.", "dvc.", "data."))})
        mlflow.log_artifacts(str(best), ADAPTER_PATH)
        mlflow.log_artifact(str(reports / "inference.json"), ADAPTER_PATH)
        mlflow.log_artifact(str(reports / "metrics.json"), "evaluation")
        pipeline = parent_run_id(params, sft_dir)
        tags["pipeline_run_id"] = pipeline
        source = f"{run.info.artifact_uri}/{ADAPTER_PATH}"
        try:
            client.create_registered_model(
                params.registry.model_name, description="LoRA adapters from defectvlm (adapter only; see base_model)."
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(params.registry.model_name, source, run_id=run_id, tags=tags)
        _wait_ready(client, params.registry.model_name, version.version)
        set_alias(client, params.registry.model_name, CANDIDATE, version.version)
        mlflow.set_tags({"registered.name": params.registry.model_name, "registered.version": version.version})
    return Registration(params.registry.model_name, version.version, run_id, pipeline, source)


def promote(
    params: Params,
    alias: str,
    version: str | None = None,
    force: bool = False,
    reason: str = "",
) -> dict:
    """Point `alias` at `version` (default: the candidate) if it qualifies, or with force and a reason.
    Returns the promotion record; raises PromotionRefused listing every reason otherwise."""
    from mlflow.exceptions import MlflowException

    if force and not reason.strip():
        raise StepFailure("--force needs --reason: say why the gates are overridden")
    name = params.registry.model_name
    client = connect(params).MlflowClient()
    try:
        challenger = (
            client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, CANDIDATE)
        )
    except MlflowException as exc:
        raise StepFailure(f"{name}: no version {version or '@' + CANDIDATE} in the registry ({exc.message})") from None
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    refusals = _gate_failures(params, challenger) + _comparison_failures(params, challenger, holder, alias)
    if refusals and not force:
        raise PromotionRefused(
            f"{name} v{challenger.version} not promoted to @{alias}:\n  - " + "\n  - ".join(refusals)
        )

    record = {
        "alias": alias,
        "version": challenger.version,
        "previous": holder.version if holder else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": os.environ.get("DEFECTVLM_USER") or getpass.getuser(),
        "forced": bool(force and refusals),
        "reason": reason,
        "overridden": refusals if force else [],
    }
    set_alias(client, name, alias, challenger.version)
    client.set_model_version_tag(name, challenger.version, f"promoted.{alias}", json.dumps(record))
    if holder and holder.version != challenger.version:
        client.set_model_version_tag(name, holder.version, f"retired.{alias}", json.dumps(record))
    model = client.get_registered_model(name)
    history = json.loads(model.tags.get(f"history.{alias}", "[]")) + [
        {k: record[k] for k in ("version", "previous", "at", "by", "forced", "reason")}
    ]
    while len(json.dumps(history)) > HISTORY_LIMIT:  # the newest moves; every move stays on its version's tags
        history.pop(0)
    client.set_registered_model_tag(name, f"history.{alias}", json.dumps(history))
    return record


def set_alias(client, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Point `alias` at `version`. The server's alias upsert is a read then an insert, so two
    registrations at once can collide on the insert (a unique-key error): try again."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _gate_failures(params: Params, version) -> list[str]:
    failures = []
    for key, minimum in sorted(params.registry.gates.items()):
        value = version.tags.get(f"{METRIC_TAG}test.{key}")
        if value is None:
            failures.append(f"test {key} was not recorded at registration")
        elif float(value) < minimum:
            failures.append(f"test {key} = {float(value):.4f} is below the gate {minimum} (registry.gates)")
    return failures


def _comparison_failures(params: Params, challenger, holder, alias: str) -> list[str]:
    if holder is None or holder.version == challenger.version:
        return []
    mine, theirs = challenger.tags.get(TEST_DIGEST_TAG), holder.tags.get(TEST_DIGEST_TAG)
    if mine is None or mine != theirs:
        return [
            f"evaluated on a different test set than @{alias} v{holder.version} "
            f"(test md5 {mine} vs {theirs}): the metrics cannot be compared"
        ]
    failures = []
    for key in sorted(params.registry.gates) or ("roi.f1", "image.auroc"):
        ours = float(challenger.tags.get(f"{METRIC_TAG}test.{key}", "nan"))
        best = float(holder.tags.get(f"{METRIC_TAG}test.{key}", "nan"))
        if not ours >= best:
            failures.append(f"test {key} = {ours:.4f} is below @{alias} v{holder.version}'s {best:.4f}")
    return failures


def _wait_ready(client, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise StepFailure(f"{name} v{version} still pending after {timeout:.0f} s")
        time.sleep(0.5)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise StepFailure(f"{path} not found")
    return json.loads(path.read_text(encoding="utf-8"))
