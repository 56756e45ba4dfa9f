"""Alias following against a real sqlite-backed MLflow registry with two registered versions of
a tiny adapter: moving the alias loads the new version in the background and swaps it in while
requests keep flowing; none fails and every answer names the version that judged it."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests

from defectvlm.config import LoraParams, PhaseParams, load_params
from defectvlm.serve.app import create_app
from defectvlm.serve.follow import AliasFollower, parse_alias_uri
from defectvlm.serve.model import Scorer
from tests.conftest import REPO
from tests.serve.conftest import b64, image_bytes, running

NAME = "tiny-adapter"


def save_tiny_adapter(folder: Path, params) -> None:
    """A phase-1 adapter of the tiny model as training saves it (untrained weights: the
    registry and loading path are under test, not the model)."""
    from defectvlm.models.families import get_family
    from defectvlm.models.loading import load_base
    from defectvlm.train.artifacts import save_trained, trained_tensors
    from defectvlm.train.phases import apply_phase

    family = get_family(params.model.family)
    base, processor = load_base(params.model)
    phase, lora = PhaseParams(max_steps=1), LoraParams(r=4, alpha=8)
    model = apply_phase(base, family, phase, lora)
    info = {
        "family": family.name,
        "base": params.model.name_or_path,
        "min_pixels": params.model.min_pixels,
        "max_pixels": params.model.max_pixels,
        "phase": 1,
        "phase_params": dataclasses.asdict(phase),
        "lora": dataclasses.asdict(lora),
    }
    save_trained(folder, model, *trained_tensors(model, family), processor, info)


def registered_loader(client, tracking_uri: str, params, template: Scorer):
    """Version -> Scorer through the registry: download the version's files, load the adapter
    with the evaluation's loader (defectvlm.load_model replaces this once it exists)."""
    from defectvlm.evaluate.run import load_for_evaluation

    def load(version: str) -> Scorer:
        source = client.get_model_version(NAME, version).source
        folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)
        model, processor = load_for_evaluation(params, Path(folder))
        model.eval()
        return dataclasses.replace(
            template, model=model, processor=processor, uri=f"models:/{NAME}/{version}", version=version
        )

    return load


@pytest.mark.slow
def test_moving_the_alias_swaps_the_model_while_requests_keep_succeeding(tmp_path, scorer):
    params = load_params(REPO / "params.yaml")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    adapter = tmp_path / "adapter"
    save_tiny_adapter(adapter, params)
    client.create_registered_model(NAME)
    for _ in range(2):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(adapter), "adapter")
        client.create_model_version(NAME, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", "1")

    name, alias = parse_alias_uri(f"models:/{NAME}@champion")
    follower = AliasFollower(client, name, alias, registered_loader(client, tracking_uri, params, scorer), 0.2)
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()
    with running(create_app(params.serve, follower.load_current, follower.follow)) as url:
        assert requests.get(f"{url}/readyz", timeout=5).json()["version"] == "1"

        def keep_asking() -> None:
            while not stop.is_set():
                body = {"image": b64(image_bytes()), "boxes": [{"xyxy": [2, 2, 30, 30]}]}
                response = requests.post(f"{url}/v1/inspect", json=body, timeout=60)
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                seen.append((response.status_code, version))

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            while len(seen) < 3:
                time.sleep(0.05)
            client.set_registered_model_alias(NAME, "champion", "2")
            deadline = time.monotonic() + 120
            while not seen or seen[-1][1] != "2":
                assert time.monotonic() < deadline, "version 2 never answered"
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            asker.join()
        metrics = requests.get(f"{url}/metrics", timeout=5).text
    versions = [version for _, version in seen]
    assert all(status == 200 for status, _ in seen), seen
    first_two = versions.index("2")
    assert first_two > 3 and set(versions[:first_two]) == {"1"} and set(versions[first_two:]) == {"2"}
    assert 'defectvlm_model_info{version="2"} 1.0' in metrics and 'version="1"' not in metrics


def test_a_registry_uri_without_load_model_is_a_clear_error():
    import defectvlm
    from defectvlm.errors import StepFailure
    from defectvlm.serve.model import load_scorer

    if hasattr(defectvlm, "load_model"):
        pytest.skip("defectvlm.load_model exists: the registry path is load_model's (see tests/inference)")
    with pytest.raises(StepFailure, match="no defectvlm.load_model"):
        load_scorer("models:/x/1", load_params(REPO / "params.yaml"))


def test_only_alias_uris_are_followed():
    assert parse_alias_uri("models:/defectvlm-adapter@champion") == ("defectvlm-adapter", "champion")
    assert parse_alias_uri("models:/defectvlm-adapter/3") is None
    assert parse_alias_uri("runs/phase3") is None
