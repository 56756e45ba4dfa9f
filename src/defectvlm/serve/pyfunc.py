"""The model as an MLflow pyfunc (models-from-code: MLflow stores this file and runs it to get
the model), so `mlflow models serve -m models:/<name>@champion` answers with the same
`load_scorer` (through `defectvlm.load_model`) and scoring (`judge_images`) as `defectvlm serve`
and `defectvlm predict`.

Input: a DataFrame with `image` (base64) and optional `boxes` (a JSON list of
`{"xyxy": [...]}`, as /v1/inspect takes it). Output: one row per region, the image's
predictions.jsonl record flattened as predictions.csv flattens it (`verdict` and `image_score`
are the image's), with the image's index, the class probabilities as JSON and the model.
The model config holds the served model's URI and the params it was registered with.

`register` writes this model into every registered version's folder, next to the adapter
(`save_inspection_model`), with the version's own URI (`models:/<name>/<version>`) in its
config: `mlflow models serve -m models:/<name>@champion` then serves that version, asking the
registry at MLFLOW_TRACKING_URI (which serving from the registry needs anyway; else the
registered params' `tracking.uri`), and every row names the version.

Its requirements pin the installed defectvlm and carry the project's constraints.txt, so
`mlflow models serve` building its own environment (without `--env-manager local`) installs
the versions that were tested."""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow

from defectvlm.errors import StepFailure

CONSTRAINTS_FILE = "constraints.txt"

COLUMNS = (
    "image_index",
    "verdict",
    "image_score",
    "threshold",
    "region",
    "xyxy",
    "p_abnormal",
    "cls",
    "class_probs",
    "uri",
    "version",
)


class InspectionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from defectvlm.config import params_from_dict
        from defectvlm.serve.model import load_scorer

        config = context.model_config
        self.params = params_from_dict(config["params"])
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or self.params.tracking.uri
        self.scorer = load_scorer(config["model"], self.params, tracking_uri=tracking_uri)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from defectvlm.serve.inputs import BadRequest, check_image, decode_base64, parse_boxes_field

        items = []
        for index, record in enumerate(model_input.to_dict("records")):
            boxes = record.get("boxes")
            if isinstance(boxes, list):
                boxes = json.dumps(boxes)
            try:
                boxes = parse_boxes_field(boxes if isinstance(boxes, str) else None)  # pandas has NaN for none
                item = check_image(decode_base64(record["image"]), boxes, self.params.serve)
            except BadRequest as exc:
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(f"row {index}: {exc.message}") from None
            items.append(item)
        rows = []
        for index, record in enumerate(self.scorer.score(items) if items else []):
            for region in record["regions"]:
                rows.append(
                    {
                        "image_index": index,
                        "verdict": record["verdict"],
                        "image_score": record["score"],
                        "threshold": record["threshold"],
                        "region": region["id"],
                        "xyxy": region["xyxy"],
                        "p_abnormal": region["p_abnormal"],
                        "cls": region["cls"],
                        "class_probs": json.dumps(region["class_probs"], sort_keys=True),
                        "uri": record["model"]["uri"],
                        "version": record["model"]["version"],
                    }
                )
        return pd.DataFrame(rows, columns=list(COLUMNS))


def save_inspection_model(path: Path, model_uri: str, params) -> Path:
    """Write the pyfunc (MLmodel, this file as its code, requirements) into the new folder `path`.
    Its config keeps the params sections it reads: `serve` (input limits) and `tracking` (the
    registry), and for the untrained `base` (demo, tests) all of them (model, prompt, classes)."""
    from defectvlm.config import params_to_dict
    from defectvlm.serve.model import BASE_URI

    if model_uri == BASE_URI:
        sections = params_to_dict(params)
    else:
        sections = {"serve": params_to_dict(params.serve), "tracking": params_to_dict(params.tracking)}
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__)),
        model_config={"model": model_uri, "params": sections},
        # what the serving environment installs; also skips MLflow's inference of the requirements
        pip_requirements=[f"defectvlm=={metadata.version('defectvlm')}", f"-c {project_constraints()}"],
    )
    return path


def project_constraints() -> Path:
    """constraints.txt, the exact versions the project installs and tests: at the root of the
    checkout this code runs from (an editable install), or in the working directory (the images
    copy it to theirs)."""
    candidates = [Path(__file__).resolve().parents[3] / CONSTRAINTS_FILE, Path.cwd() / CONSTRAINTS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise StepFailure(
        f"no {CONSTRAINTS_FILE} in {' or '.join(str(c.parent) for c in candidates)}: the served model's "
        "environment would not be the tested one; run from the repository or an image of it"
    )


def log_inspection_model(model_uri: str, params, artifact_path: str = "inspection") -> str:
    """Log the pyfunc into `artifact_path` of the active MLflow run (files already there stay:
    `register` adds it to the adapter's folder); returns the folder's artifact URI."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(save_inspection_model(Path(tmp) / "model", model_uri, params)), artifact_path)
    return mlflow.get_artifact_uri(artifact_path)


mlflow.models.set_model(InspectionModel())
