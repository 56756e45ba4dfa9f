"""The model registry (MLflow aliases, not the deprecated stages).

`register` adds the evaluated adapter as a new version of `registry.model_name`: the
adapter files only (the base model is recorded by id or path, never copied), its inference
config (threshold chosen on val) and, in the same folder, the MLflow pyfunc that serves this
version (serve/pyfunc.py; `mlflow models serve -m models:/<name>@<alias>`); test metrics, data
digests and git commit as version tags,
and points the `candidate` alias at it unless the candidate already comes from a later
pipeline run (a slow registration never moves it back). `promote` moves an alias (e.g.
`champion`) to a version when it passes `registry.gates` and matches or beats the current
holder on the same test set; a candidate tested on a newer test set than the holder's makes
promote re-score the holder on that test set first. Every move is recorded in the version's
and the model's tags.

Concurrent moves of one alias are serialised by a lock that works on any tracking store,
local or remote (tracking/store_lock.py): a registered model `<model>.lock.<alias>` that exists
while someone moves the alias. A promotion decides against the holder it read; if the alias
moved while it was deciding, it loses and says so instead of overwriting a fresh decision."""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from defectvlm.config import Params
from defectvlm.errors import StepFailure
from defectvlm.io import read_json_file
from defectvlm.tracking.lineage import file_md5, split_digests
from defectvlm.tracking.mlflow_tracking import STEP_TAG, connect, evaluation_metrics, parent_run_id, step_run
from defectvlm.tracking.store_lock import retry_lost_insert, store_lock

CANDIDATE = "candidate"
ADAPTER_PATH = "adapter"
TEST_DIGEST_TAG = "data.sft.test.md5"
METRIC_TAG = "metric."  # + "test.roi.f1", ...
PARITY_TAG = "export.parity"  # the export's parity record, set by `defectvlm export`
HISTORY_LIMIT = 4000  # characters kept in a model's promotion-history tag


class PromotionRefused(StepFailure):
    """The challenger does not qualify; the message lists every reason."""


class PromotionLost(PromotionRefused):
    """Another promotion moved the alias while this one was deciding."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    pipeline_run_id: str
    source: str
    candidate: str  # the version @candidate points at afterwards (this one, or a later pipeline run's)


def register(params: Params, best: Path, reports: Path, sft_dir: Path) -> Registration:
    """Register `best` (a phase's best/ folder) with the evaluation in `reports`."""
    from mlflow.exceptions import MlflowException

    from defectvlm.serve.pyfunc import log_inspection_model

    metrics = read_json_file(reports / "metrics.json")
    inference = read_json_file(reports / "inference.json")
    if Path(metrics["run"]) != best.parent:
        raise StepFailure(f"{reports}/metrics.json evaluates {metrics['run']}, not {best.parent}: run evaluate first")
    if metrics["split"] != "test":
        raise StepFailure(f"{reports}/metrics.json holds {metrics['split']} metrics: register needs the test split's")
    phase = read_json_file(best / "phase.json")
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
        # the version's folder is also an MLflow pyfunc of itself: `mlflow models serve -m models:/...`
        log_inspection_model(f"models:/{params.registry.model_name}/{version.version}", params, ADAPTER_PATH)
        candidate = _move_candidate_forward(client, params.registry.model_name, version.version)
        mlflow.set_tags({"registered.name": params.registry.model_name, "registered.version": version.version})
    return Registration(params.registry.model_name, version.version, run_id, pipeline, source, candidate)


def _move_candidate_forward(client, name: str, version: str) -> str:
    """Point @candidate at `version` unless it holds a version of a later pipeline run (or a
    later version of the same run); returns where @candidate points afterwards."""
    with alias_lock(client, name, CANDIDATE):
        current = _alias_version(client, name, CANDIDATE)
        if current is not None and _pipeline_order(client, name, current) > _pipeline_order(client, name, version):
            return current
        set_alias(client, name, CANDIDATE, version)
        return str(version)


def _pipeline_order(client, name: str, version: str) -> tuple[int, int]:
    """(start time of the version's pipeline run, version number): later pipeline runs sort later."""
    from mlflow.exceptions import MlflowException

    pipeline = client.get_model_version(name, version).tags.get("pipeline_run_id")
    try:
        started = client.get_run(pipeline).info.start_time if pipeline else 0
    except MlflowException:
        started = 0
    return started or 0, int(version)


def promote(
    params: Params,
    alias: str,
    version: str | None = None,
    force: bool = False,
    reason: str = "",
    sft_dir: Path = Path("data/04_sft"),
) -> dict:
    """Point `alias` at `version` (default: the candidate) if it qualifies, or with force and a reason.
    Returns the promotion record; raises PromotionRefused listing every reason otherwise, and
    PromotionLost when another promotion moved the alias meanwhile. `sft_dir` holds the
    candidate's test set, on which a holder tested on an older one is re-scored."""
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
    refusals = _gate_failures(params, challenger) + _comparison_failures(
        params, client, challenger, holder, alias, sft_dir
    )
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
    with alias_lock(client, name, alias):
        now = _alias_version(client, name, alias)
        if now != (str(holder.version) if holder else None):
            raise PromotionLost(
                f"{name} v{challenger.version} not promoted to @{alias}: another promotion moved @{alias} to "
                f"v{now} while this one compared against v{record['previous']}. "
                f"Run promote again to compare with v{now}"
            )
        set_alias(client, name, alias, challenger.version)
        now = _alias_version(client, name, alias)
        if now != str(challenger.version):  # someone moved it without the lock (UI, another tool)
            raise PromotionLost(f"{name}: @{alias} was moved to v{now} right after this promotion set it")
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


def alias_lock(client, name: str, alias: str):
    """Hold the registry-wide lock on moving `name@alias` (see the module doc)."""
    return store_lock(client, f"{name}.lock.{alias}", f"{alias} of {name} is being moved")


def _alias_version(client, name: str, alias: str) -> str | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def set_alias(client, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`. The server's alias upsert is a read then an insert, so two
    registrations at once can collide on the insert (a unique-key error): try again."""
    retry_lost_insert(client.set_registered_model_alias, name, alias, version)


def parity_failure(params: Params, version) -> str | None:
    """Why `version` (an MLflow ModelVersion) may not be promoted or deployed under
    registry.require_export_parity: its export's parity check is missing or failed; None: it may."""
    if not params.registry.require_export_parity:
        return None
    parity = json.loads(version.tags.get(PARITY_TAG, "null"))
    if parity is None:
        return (
            f"no export parity check recorded (run `defectvlm export --model models:/{version.name}/"
            f"{version.version}`; registry.require_export_parity)"
        )
    if not parity.get("passed"):
        return (
            f"its export failed the parity check (max |dP| {parity.get('max_abs_diff')} > "
            f"{parity.get('tolerance')}; registry.require_export_parity)"
        )
    return None


def _gate_failures(params: Params, version) -> list[str]:
    parity = parity_failure(params, version)
    failures = [parity] if parity else []
    for key, minimum in sorted(params.registry.gates.items()):
        value = version.tags.get(f"{METRIC_TAG}test.{key}")
        if value is None:
            failures.append(f"test {key} was not recorded at registration")
        elif float(value) < minimum:
            failures.append(f"test {key} = {float(value):.4f} is below the gate {minimum} (registry.gates)")
    return failures


def _comparison_failures(params: Params, client, challenger, holder, alias: str, sft_dir: Path) -> list[str]:
    if holder is None or holder.version == challenger.version:
        return []
    mine, theirs = challenger.tags.get(TEST_DIGEST_TAG), holder.tags.get(TEST_DIGEST_TAG)
    against = f"@{alias} v{holder.version}"
    holder_metrics = {k[len(METRIC_TAG) :]: float(v) for k, v in holder.tags.items() if k.startswith(METRIC_TAG)}
    if mine is None or mine != theirs:
        if mine is None or challenger.creation_timestamp < holder.creation_timestamp:
            return [
                f"evaluated on a different test set than {against} (test md5 {mine} vs {theirs}): "
                "the metrics cannot be compared"
            ]
        test = sft_dir / "test.jsonl"
        if not test.exists() or file_md5(test) != mine:
            return [
                f"tested on a newer test set than {against} (md5 {mine}); {test} is not that test set, so "
                f"{against} cannot be re-scored on it: "
                f"pass --in with the SFT folder v{challenger.version} was tested on"
            ]
        holder_metrics = reevaluate(params, client, holder, challenger, sft_dir)
        against += f" (re-scored on test set {mine[:8]})"
    failures = []
    for key in sorted(params.registry.gates) or ("roi.f1", "image.auroc"):
        ours = float(challenger.tags.get(f"{METRIC_TAG}test.{key}", "nan"))
        best = holder_metrics.get(f"test.{key}", float("nan"))
        if not ours >= best:
            failures.append(f"test {key} = {ours:.4f} is below {against}'s {best:.4f}")
    return failures


def reevaluate(params: Params, client, holder, challenger, sft_dir: Path) -> dict[str, float]:
    """Score the holder's adapter on `sft_dir` (threshold on its val, metrics on its test: the
    evaluate step's scoring pass) and log it as a `reevaluate` run under the challenger's
    pipeline run; the holder's version gets the figures as `reevaluated.<test md5>`."""
    from defectvlm.evaluate.run import evaluate_model, load_for_evaluation

    test_md5 = file_md5(sft_dir / "test.jsonl")
    summary = sft_dir / "sft_summary.json"
    if not summary.exists():
        raise StepFailure(f"{summary} not found: --in must be a build-sft output folder")
    classes = json.loads(summary.read_text(encoding="utf-8"))["classes"]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(client.download_artifacts(holder.run_id, ADAPTER_PATH, tmp))
        model, processor = load_for_evaluation(params, adapter)
        result, _ = evaluate_model(model, processor, sft_dir, "test", classes, "score")
    metrics = evaluation_metrics({"split": "test", "test": result})
    pipeline = challenger.tags.get("pipeline_run_id")
    experiment = (
        client.get_run(pipeline).info.experiment_id if pipeline else client.get_run(holder.run_id).info.experiment_id
    )
    tags = {STEP_TAG: "reevaluate", TEST_DIGEST_TAG: test_md5, "defectvlm.reevaluated_version": holder.version}
    if pipeline:
        tags["mlflow.parentRunId"] = pipeline
    run = client.create_run(experiment, run_name=f"reevaluate-v{holder.version}", tags=tags)
    client.log_batch(run.info.run_id, metrics=[_metric(k, v) for k, v in sorted(metrics.items())])
    client.set_terminated(run.info.run_id)
    record = {"run_id": run.info.run_id, **{k: v for k, v in metrics.items() if k.startswith("test.")}}
    client.set_model_version_tag(holder.name, holder.version, f"reevaluated.{test_md5}", json.dumps(record))
    return metrics


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def _wait_ready(client, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise StepFailure(f"{name} v{version} still pending after {timeout:.0f} s")
        time.sleep(0.5)
