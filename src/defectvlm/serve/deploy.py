"""`defectvlm deploy render`: KServe InferenceServices for the served model.

- `inferenceservice.yaml`: the training image running `defectvlm serve` on the *resolved*
  registry version (an alias is pinned at render time, so a rollout is a new render), with
  the GPU, memory and scheduling of the `cluster` section, readiness on /readyz, liveness on
  /healthz and the bearer token from a Kubernetes secret.
- `inferenceservice-vllm.yaml` (with `--export-uri`): the merged export served by KServe's
  Hugging Face runtime on its vLLM backend, with the pixel budget the model was trained on
  (a different budget changes the box frame of Qwen2.5-VL)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from defectvlm.config import Params
from defectvlm.errors import StepFailure

PORT = 8080
TOKEN_SECRET = "defectvlm-serve"  # kubectl create secret generic defectvlm-serve --from-literal=token=...
_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def resolve_version(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(name, version) of a models:/ URI; an alias is asked of the registry."""
    match = _REGISTRY.match(uri)
    if not match:
        raise StepFailure(f"--model {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if match["version"]:
        return match["name"], match["version"]
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return match["name"], str(client.get_model_version_by_alias(match["name"], match["alias"]).version)
    except MlflowException as exc:
        raise StepFailure(f"--model {uri}: not in the registry at {tracking_uri} ({exc.message})") from None


def refuse_without_parity(params: Params, name: str, version: str) -> None:
    """Under registry.require_export_parity, a version whose export's parity check is missing or
    failed is not deployed (the gate `promote` applies)."""
    if not params.registry.require_export_parity:
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    from defectvlm.tracking.registry import parity_failure

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri, registry_uri=params.tracking.uri)
    try:
        registered = client.get_model_version(name, version)
    except MlflowException as exc:
        raise StepFailure(
            f"models:/{name}/{version}: not in the registry at {params.tracking.uri} ({exc.message})"
        ) from None
    problem = parity_failure(params, registered)
    if problem:
        raise StepFailure(f"models:/{name}/{version} is not deployed: {problem}")


def resource_name(name: str, version: str) -> str:
    """A DNS-1035 label (what KServe requires of an InferenceService name)."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"{name}-v{version}".lower()).strip("-")
    if not label[:1].isalpha():
        label = f"m-{label}"
    return label[:63].rstrip("-")


def _scheduling(params: Params) -> dict:
    cluster = params.cluster
    spec = {"minReplicas": 1, "maxReplicas": 1, "tolerations": cluster.tolerations}
    if cluster.node_selector:
        spec["nodeSelector"] = cluster.node_selector
    if cluster.service_account:
        spec["serviceAccountName"] = cluster.service_account
    return spec


def _resources(params: Params) -> dict:
    cluster = params.cluster
    gpus = {cluster.accelerator_type: str(cluster.gpus)} if cluster.gpus else {}
    return {
        "requests": {"cpu": cluster.train_cpu, "memory": cluster.train_memory, **gpus},
        "limits": {"memory": cluster.train_memory, **gpus},
    }


def _metadata(name: str, model: str, version: str, variant: str) -> dict:
    return {
        "name": name,
        "labels": {"app.kubernetes.io/name": "defectvlm", "defectvlm/variant": variant},
        "annotations": {"defectvlm/model": model, "defectvlm/version": version},
    }


def defectvlm_service(params: Params, name: str, version: str, image: str) -> dict:
    model = f"models:/{name}/{version}"
    probe = {"httpGet": {"path": "/readyz", "port": PORT}, "periodSeconds": 5, "failureThreshold": 120}
    secrets = [{"secretRef": {"name": secret}} for secret in sorted(params.cluster.secrets)]
    container = {
        "name": "kserve-container",
        "image": image,
        "command": ["defectvlm", "serve"],
        "args": ["--model", model, "--no-follow", "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "env": [
            {
                "name": params.serve.token_env,
                "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}},
            },
            {"name": "MLFLOW_TRACKING_URI", "value": params.tracking.uri},
        ],
        "envFrom": secrets,
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 10},
        "resources": _resources(params),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(resource_name(name, version), model, version, "defectvlm"),
        "spec": {"predictor": {**_scheduling(params), "containers": [container]}},
    }


def vllm_service(params: Params, name: str, version: str, export_uri: str) -> dict:
    pixels = {"min_pixels": params.model.min_pixels, "max_pixels": params.model.max_pixels}
    model = {
        "modelFormat": {"name": "huggingface"},
        "storageUri": export_uri,
        "args": [
            f"--model_name={name}",
            "--backend=vllm",
            "--dtype=bfloat16",
            "--limit-mm-per-prompt",
            json.dumps({"image": 1 + params.serve.max_boxes}),  # the whole image and a crop per region
            "--mm-processor-kwargs",
            json.dumps(pixels),
        ],
        "resources": _resources(params),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(resource_name(name, version) + "-vllm", f"models:/{name}/{version}", version, "vllm"),
        "spec": {"predictor": {**_scheduling(params), "model": model}},
    }


def render(params: Params, model_uri: str, out: Path, export_uri: str | None = None) -> list[Path]:
    from defectvlm.cluster.images import image

    name, version = resolve_version(model_uri, params.tracking.uri)
    refuse_without_parity(params, name, version)
    documents = {
        "inferenceservice.yaml": defectvlm_service(params, name, version, image("train", params.cluster.image_registry))
    }
    if export_uri:
        documents["inferenceservice-vllm.yaml"] = vllm_service(params, name, version, export_uri)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, document in documents.items():
        path = out / file_name
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        written.append(path)
    return written
