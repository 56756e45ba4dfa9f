"""`load_model(uri)`: the one way to get a usable model, from the registry
(`models:/<name>@<alias>`, `models:/<name>/<version>`), a run folder (`runs/phase3` or its
`best/`) or an export folder (a merged checkpoint with `defectvlm.json`).

An adapter is loaded the standard way, `PeftModel.from_pretrained(base, folder)`: the folder
is a self-contained PEFT adapter (see train/artifacts.py)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from defectvlm.config import ModelParams
from defectvlm.errors import StepFailure

EXPORT_FILE = "defectvlm.json"
INFERENCE_FILE = "inference.json"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class InferenceConfig:
    """How to use the model: its frame, prompt and decision threshold."""

    uri: str
    family: str
    base: str
    min_pixels: int
    max_pixels: int
    classes: list[str]
    prompt: dict  # prompt.json: templates, glossary, classes, default window size
    threshold: float | None = None
    registry: dict | None = None  # {"name", "version"} when the model came from the registry
    kind: str = "adapter"  # adapter | export
    folder: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def model_params(self) -> ModelParams:
        return ModelParams(
            family=self.family, name_or_path=self.base, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )


@dataclass
class LoadedModel:
    model: object
    processor: object
    config: InferenceConfig


def tracking_uri_default() -> str | None:
    """MLFLOW_TRACKING_URI, else the tracking.uri of ./params.yaml."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path("params.yaml").exists():
        from defectvlm.config import load_params

        return load_params("params.yaml").tracking.uri
    return None


def resolve_registry(uri: str, tracking_uri: str | None) -> tuple[Path, dict]:
    """Download a registered version's adapter; (local folder, {"name", "version"})."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _REGISTRY_URI.match(uri)
    if not match:
        raise StepFailure(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    tracking_uri = tracking_uri or tracking_uri_default()
    if not tracking_uri:
        raise StepFailure(f"{uri}: no registry to ask (set MLFLOW_TRACKING_URI or run where params.yaml is)")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise StepFailure(f"{uri}: the registry at {tracking_uri} has no {what} of {name} ({exc.message})") from None
    local = mlflow.artifacts.download_artifacts(artifact_uri=found.source, tracking_uri=tracking_uri)
    return Path(local), {"name": name, "version": str(found.version), "tracking_uri": tracking_uri}


def adapter_folder(path: Path) -> Path:
    """A run folder's best/, or the folder itself when it is an adapter."""
    if (path / "best" / "phase.json").exists():
        return path / "best"
    if (path / "phase.json").exists():
        return path
    raise StepFailure(f"{path}: not a run folder (with best/), an adapter (phase.json) or an export ({EXPORT_FILE})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise StepFailure(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise StepFailure(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def adapter_config(folder: Path, uri: str, registry: dict | None) -> InferenceConfig:
    from defectvlm.train.artifacts import PROMPT_FILE, read_phase_info

    info = read_phase_info(folder)
    if not (folder / PROMPT_FILE).exists():
        raise StepFailure(f"{folder}/{PROMPT_FILE} not found: an adapter saved before prompt.json existed; retrain it")
    prompt = _read_json(folder / PROMPT_FILE)
    inference = _read_json(folder / INFERENCE_FILE) if (folder / INFERENCE_FILE).exists() else {}
    return InferenceConfig(
        uri=uri,
        family=info["family"],
        base=info["base"],
        min_pixels=info["min_pixels"],
        max_pixels=info["max_pixels"],
        classes=prompt["classes"],
        prompt=prompt,
        threshold=inference.get("threshold"),
        registry=registry,
        folder=str(folder),
        extra={"phase": info["phase"]},
    )


def export_config(folder: Path, uri: str) -> InferenceConfig:
    meta = _read_json(folder / EXPORT_FILE)
    return InferenceConfig(
        uri=uri,
        family=meta["family"],
        base=meta["base"],
        min_pixels=meta["min_pixels"],
        max_pixels=meta["max_pixels"],
        classes=meta["classes"],
        prompt=meta["prompt"],
        threshold=meta.get("threshold"),
        registry=meta.get("registry"),
        kind="export",
        folder=str(folder),
    )


def load_adapter(folder: Path, config: InferenceConfig):
    """(model, processor): the base with the adapter loaded the standard PEFT way."""
    from peft import PeftModel

    from defectvlm.models.loading import load_base

    base, processor = load_base(config.model_params)
    return PeftModel.from_pretrained(base, str(folder)), processor


def load_export(folder: Path, config: InferenceConfig, dtype=None):
    """(model, processor) of a merged export, with plain transformers (no PEFT, no defectvlm)."""
    import transformers

    from defectvlm.models.families import get_family

    model_class = getattr(transformers, get_family(config.family).model_class)
    model = model_class.from_pretrained(str(folder), **({"dtype": dtype} if dtype else {}))
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    return model, processor


def load_model(uri: str | Path, device: str | None = None, tracking_uri: str | None = None) -> LoadedModel:
    """A ready model (eval mode, on `device`), its processor and its inference config."""
    import torch

    uri = str(uri)
    registry = None
    if uri.startswith("models:/"):
        folder, registry = resolve_registry(uri, tracking_uri)
    else:
        folder = Path(uri)
        if not folder.exists():
            raise StepFailure(f"{uri}: no such folder (and not a models:/ registry URI)")
    if (folder / EXPORT_FILE).exists():
        config = export_config(folder, uri)
        model, processor = load_export(folder, config)
    else:
        folder = adapter_folder(folder)
        config = adapter_config(folder, uri, registry)
        model, processor = load_adapter(folder, config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return LoadedModel(model, processor, config)
