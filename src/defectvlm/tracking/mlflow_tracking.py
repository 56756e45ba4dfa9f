"""MLflow glue: one run per training phase with the flattened parameters, per-step metrics
and the trainable-parameter table. Credentials come from the environment (MLFLOW_TRACKING_*
variables), never from params.yaml, and are never logged."""

from __future__ import annotations

import json
from pathlib import Path

from defectvlm.config import Params, params_to_dict


def flatten_params(params: Params) -> dict[str, str]:
    """Dotted keys for every section field; mappings and lists as JSON text."""
    flat: dict[str, str] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and key.count(".") < 2 and not key.endswith(("label_map", "ratios", "task_weights")):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            flat[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)

    walk(params_to_dict(params), "")
    return flat


class MlflowTracking:
    def __init__(self, params: Params):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(params.tracking.uri)
        mlflow.set_experiment(params.tracking.experiment)

    def phase_logger(self, params: Params, phase: int, table: list[dict]) -> PhaseRun:
        return PhaseRun(self.mlflow, params, phase, table)


class PhaseRun:
    def __init__(self, mlflow, params: Params, phase: int, table: list[dict]):
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=f"phase{phase}")
        mlflow.set_tag("defectvlm.step", f"train_phase{phase}")
        mlflow.log_params(flatten_params(params))
        mlflow.log_params({f"trainable.{row['group']}.{row['kind']}": row["trainable"] for row in table})
        mlflow.log_dict(table, "trainable_parameters.json")

    def log_metrics(self, record: dict) -> None:
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.mlflow.log_metrics(values, step=int(record["step"]))

    def finish(self, metrics: dict, out: Path) -> None:
        self.mlflow.log_dict(metrics, "metrics.json")
        self.mlflow.end_run()


def log_evaluation(params: Params, run_dir: Path, metrics: dict, report_dir: Path) -> str | None:
    """Add evaluation metrics, plots and the report to the training phase's MLflow run."""
    import mlflow

    train_metrics = run_dir / "metrics.json"
    run_id = (
        json.loads(train_metrics.read_text(encoding="utf-8")).get("mlflow_run_id") if train_metrics.exists() else None
    )
    if run_id is None:
        return None
    mlflow.set_tracking_uri(params.tracking.uri)
    values = {}
    for part in (metrics["split"], "baseline"):
        for level in ("roi", "image"):
            for key, value in ((metrics.get(part) or {}).get(level) or {}).items():
                if isinstance(value, (int, float)):
                    values[f"{part}_{level}_{key}"] = float(value)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(values)
        mlflow.log_metric("threshold", float(metrics[metrics["split"]]["threshold"]))
        mlflow.log_artifacts(str(report_dir / "plots"), "evaluation/plots")
        mlflow.log_artifact(str(report_dir / "report.md"), "evaluation")
        mlflow.log_artifact(str(report_dir / "metrics.json"), "evaluation")
    return run_id
