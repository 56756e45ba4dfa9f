"""The detector in MLflow: a `train_detector` run (its parameters, val metrics and output folder)
and a version of `<registry.model_name>-detector` with the lineage tags every run carries
(git commit and dirty flag, DVC digests, data version), pointed at by `@candidate`.

The detector reads the split files, not the SFT files, so its data digests are those of
`data/02_split/{train,val}.jsonl` (tags `data.split.<name>.md5`)."""

from __future__ import annotations

from pathlib import Path

from defectvlm.config import Params, params_to_dict
from defectvlm.detector.loading import detector_model_name
from defectvlm.tracking.lineage import lineage_tags, split_digests
from defectvlm.tracking.mlflow_tracking import STEP_TAG, connect
from defectvlm.tracking.registry import CANDIDATE, _wait_ready, set_alias

ARTIFACT_PATH = "detector"
STEP = "train_detector"


def detector_lineage(params: Params, split_dir: Path) -> dict[str, str]:
    tags = {k: v for k, v in lineage_tags(params, split_dir).items() if not k.startswith("data.sft.")}
    tags.update({f"data.split.{name}.md5": md5 for name, md5 in split_digests(split_dir, ("train", "val")).items()})
    return tags


def log_and_register(params: Params, split_dir: Path, folder: Path, metrics: dict) -> dict:
    """Log the run, register its folder; returns {"name", "version", "run_id", "alias"}."""
    from mlflow.exceptions import MlflowException

    mlflow = connect(params)
    tags = {STEP_TAG: STEP, **detector_lineage(params, split_dir)}
    logged = {f"detector.{k}": str(v) for k, v in params_to_dict(params.detector).items()}
    logged["regions.max_boxes_per_image"] = str(params.regions.max_boxes_per_image)
    logged["regions.min_box_size"] = str(params.regions.min_box_size)
    values = {f"val.{k}": float(v) for k, v in metrics["val"].items() if isinstance(v, (int, float))}
    values.update({k: float(metrics[k]) for k in ("train_seconds", "final_loss", "onnx_images_per_second")})
    with mlflow.start_run(run_name=STEP, tags=tags) as run:
        mlflow.log_params(logged)
        mlflow.log_metrics(values)
        mlflow.log_artifacts(str(folder), ARTIFACT_PATH)
        run_id = run.info.run_id
    name = detector_model_name(params)
    version_tags = {
        **tags,
        **{f"metric.{k}": str(v) for k, v in values.items()},
        "classes": ",".join(metrics["classes"]),
    }
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name, description="Proposal detectors of the defectvlm cascade (ONNX).")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id, tags=version_tags)
    _wait_ready(client, name, version.version)
    set_alias(client, name, CANDIDATE, version.version)
    return {"name": name, "version": str(version.version), "run_id": run_id, "alias": CANDIDATE}
