"""MLflow glue. One parent run per pipeline execution, found by its pipeline key (same code,
uncommitted changes included, data digests and parameters), created by the first step that
logs; under it a nested run per training phase, for the evaluation and for the registration.
The parent carries the flattened parameters, the lineage tags (git commit, dirty flag and diff
digest, data digests, data version), the dvc.lock / .dvc files of the data version and the
resolved parameters; step runs log the SFT splits they read as dataset inputs whose digest
is the file's md5 (the digest DVC records). Credentials come from the environment
(MLFLOW_TRACKING_*, AWS_*), never from params.yaml, and are never logged."""

from __future__ import annotations

import json
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from defectvlm.config import Params, params_to_dict
from defectvlm.errors import StepFailure
from defectvlm.tracking.lineage import lineage_files, lineage_tags, pipeline_key, split_digests
from defectvlm.tracking.store_lock import retry_lost_insert, store_lock

PIPELINE_KEY_TAG = "defectvlm.pipeline_key"
STEP_TAG = "defectvlm.step"
LINEAGE_FILE = "lineage.json"
_UNFLATTENED = ("label_map", "ratios", "task_weights", "gates")


def flatten_params(params: Params) -> dict[str, str]:
    """Dotted keys for every section field; mappings and lists as JSON text."""
    flat: dict[str, str] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and key.count(".") < 2 and not key.endswith(_UNFLATTENED):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            flat[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)

    walk(params_to_dict(params), "")
    return flat


def connect(params: Params):
    """The mlflow module, pointed at params.tracking (uri and experiment). A server that does
    not answer is a StepFailure at once, not minutes of retries and a traceback."""
    import mlflow

    check_reachable(params.tracking.uri)
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_experiment(params.tracking.experiment)
    return mlflow


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Open (and close) a TCP connection to an http(s) tracking server."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise StepFailure(
            f"cannot reach the MLflow tracking server at {uri} (tracking.uri): {exc.strerror or exc}. "
            "Start the server, fix tracking.uri in params.yaml (or -S tracking.uri=...), "
            "or run the step with --no-tracking where it has one"
        ) from None


def end_active_runs(status: str) -> None:
    """End the runs this process still has open with `status` (FAILED after an error, KILLED
    after an interrupt): without this, MLflow's exit hook would record a crashed step FINISHED."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        try:
            mlflow.end_run(status)  # pops the run before it writes the status
        except Exception:  # noqa: BLE001 - the store may be what failed; the step's own error is reported
            continue


def parent_run_id(params: Params, sft_dir: Path) -> str:
    """The pipeline execution's parent run: found by its key, or created with params and lineage."""
    mlflow = connect(params)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id
    key = pipeline_key(params, sft_dir)
    found = _pipeline_run(client, experiment_id, key)
    if found:
        return found
    # Steps that start together (parallel DAG branches, concurrent registrations) would each find
    # none and create one: the lookup and the creation (with its parameters) hold a lock on the key.
    with store_lock(client, f"defectvlm.lock.pipeline.{key[:16]}", f"pipeline run {key[:8]} is being created"):
        found = _pipeline_run(client, experiment_id, key)
        if found:
            return found
        tags = {PIPELINE_KEY_TAG: key, STEP_TAG: "pipeline", **lineage_tags(params, sft_dir)}
        run_id = client.create_run(experiment_id, run_name=f"pipeline-{key[:8]}", tags=tags).info.run_id
        items = sorted(flatten_params(params).items())
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params per call
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])
        client.log_dict(run_id, params_to_dict(params), "params.resolved.json")
        client.set_terminated(run_id)
    return run_id


@contextmanager
def step_run(params: Params, sft_dir: Path, name: str, inputs: tuple[str, ...]) -> Iterator:
    """A nested run for one step under the pipeline's parent run, with the SFT splits it
    reads logged as dataset inputs (context = split name)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    parent = parent_run_id(params, sft_dir)
    mlflow = connect(params)
    tags = {STEP_TAG: name, **lineage_tags(params, sft_dir)}
    mlflow.MlflowClient().log_dict(parent, lineage_files(params), LINEAGE_FILE)
    with mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags) as run:
        for split, digest in split_digests(sft_dir, inputs).items():
            with warnings.catch_warnings():  # a local path matches two equivalent registered source kinds
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str((sft_dir / f"{split}.jsonl").resolve()))
            dataset = MetaDataset(source, name=f"sft.{split}", digest=digest)
            retry_lost_insert(mlflow.log_input, dataset, context=split)
        yield run
    mlflow.MlflowClient().set_terminated(parent)


class MlflowTracking:
    """What the training recipe talks to: one nested run per phase."""

    def __init__(self, params: Params, sft_dir: Path):
        self.params = params
        self.sft_dir = sft_dir

    def phase_logger(self, params: Params, phase: int, table: list[dict]) -> PhaseRun:
        return PhaseRun(step_run(params, self.sft_dir, f"train_phase{phase}", ("train", "val")), params, table)


def _pipeline_run(client, experiment_id: str, key: str) -> str | None:
    """The id of the active parent run with this pipeline key, if there is one."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


class PhaseRun:
    def __init__(self, context, params: Params, table: list[dict]):
        import mlflow

        self.mlflow = mlflow
        self.context = context
        self.run = context.__enter__()
        mlflow.log_params(flatten_params(params))
        mlflow.log_params({f"trainable.{row['group']}.{row['kind']}": row["trainable"] for row in table})
        mlflow.log_dict(table, "trainable_parameters.json")

    def log_metrics(self, record: dict) -> None:
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.mlflow.log_metrics(values, step=int(record["step"]))

    def finish(self, metrics: dict, out: Path) -> None:
        self.mlflow.log_dict(metrics, "metrics.json")
        self.context.__exit__(None, None, None)


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """Flat `<split>.<level>.<metric>` numbers of an evaluation (fine-tuned and baseline)."""
    values = {}
    for part in (metrics["split"], "baseline"):
        for level in ("roi", "image"):
            for key, value in ((metrics.get(part) or {}).get(level) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f"{part}.{level}.{key}"] = float(value)
    values["threshold"] = float(metrics[metrics["split"]]["threshold"])
    return values


def log_evaluation(params: Params, sft_dir: Path, metrics: dict, report_dir: Path) -> str:
    """A nested `evaluate` run: the metrics, plots and report, linked to the phase run it evaluated."""
    import mlflow

    run_dir = Path(metrics["run"])
    train_metrics = run_dir / "metrics.json"
    phase_run = (
        json.loads(train_metrics.read_text(encoding="utf-8")).get("mlflow_run_id") if train_metrics.exists() else None
    )
    with step_run(params, sft_dir, "evaluate", ("val", metrics["split"])) as run:
        mlflow.set_tags({"defectvlm.evaluated_run_dir": str(run_dir), "defectvlm.phase_run_id": str(phase_run)})
        mlflow.log_metrics(evaluation_metrics(metrics))
        mlflow.log_artifacts(str(report_dir / "plots"), "plots")
        for name in ("report.md", "metrics.json", "inference.json"):
            mlflow.log_artifact(str(report_dir / name))
        return run.info.run_id
