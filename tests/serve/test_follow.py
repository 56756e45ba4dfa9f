"""Alias following against a real sqlite-backed MLflow registry with two registered versions of
a tiny adapter, each loaded by `load_scorer` through `defectvlm.load_model`: moving the alias
loads the new version in the background and swaps it in while requests keep flowing; none
fails and every answer names the version that judged it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests

from defectvlm.config import LoraParams, PhaseParams, load_params
from defectvlm.serve.app import create_app
from defectvlm.serve.follow import AliasFollower, parse_alias_uri
from defectvlm.serve.model import load_scorer
from defectvlm.serve.run import build_app
from tests.conftest import REPO
from tests.serve.conftest import b64, image_bytes, running

NAME = "tiny-adapter"


def save_tiny_adapter(folder: Path, params) -> None:
    """A phase-1 adapter of the tiny model as training saves it, with its prompt config
    (untrained weights: the registry and loading path are under test, not the model)."""
    from defectvlm.data.sft import load_knowledge, load_templates
    from defectvlm.models.families import get_family
    from defectvlm.models.loading import load_base
    from defectvlm.serve.model import base_classes
    from defectvlm.train.artifacts import prompt_config, save_trained, trained_tensors
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
        "phase_params": phase.model_dump(),
        "lora": lora.model_dump(),
    }
    sft = params.sft
    prompt = prompt_config(sft, load_templates(sft), load_knowledge(sft), base_classes(params), train=[])
    save_trained(folder, model, *trained_tensors(model, family), family, processor, info, prompt)


def registry(tmp_path: Path, versions: int):
    """(params pointing at a fresh sqlite registry, its client) with `versions` registered
    versions of one tiny adapter (none when 0: the name only)."""
    params = load_params(REPO / "params.yaml")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": tracking_uri})})
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(NAME)
    if versions:
        experiment = client.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
        adapter = tmp_path / "adapter"
        save_tiny_adapter(adapter, params)
        for _ in range(versions):
            run = client.create_run(experiment)
            client.log_artifacts(run.info.run_id, str(adapter), "adapter")
            client.create_model_version(NAME, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    return params, client


@pytest.mark.slow
def test_moving_the_alias_swaps_the_model_while_requests_keep_succeeding(tmp_path):
    params, client = registry(tmp_path, versions=2)
    client.set_registered_model_alias(NAME, "champion", "1")

    name, alias = parse_alias_uri(f"models:/{NAME}@champion")
    follower = AliasFollower(client, name, alias, lambda v: load_scorer(f"models:/{NAME}/{v}", params), interval_s=0.2)
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


@pytest.mark.parametrize("follow", [True, False])
def test_an_unknown_alias_is_a_clear_error_and_the_service_stays_not_ready(tmp_path, follow):
    params, _ = registry(tmp_path, versions=0)
    with running(build_app(params, f"models:/{NAME}@nope", follow=follow), wait_ready=False) as url:
        deadline = time.monotonic() + 60
        while (answer := requests.get(f"{url}/readyz", timeout=5)).json()["detail"] == "model loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert answer.status_code == 503
        detail = answer.json()["detail"]
        assert detail.startswith(f"model failed to load: models:/{NAME}@nope: ") and "alias" in detail, detail
        assert "Traceback" not in detail
        inspect = requests.post(f"{url}/v1/inspect", json={"image": b64(image_bytes())}, timeout=10)
        assert inspect.status_code == 503 and requests.get(f"{url}/readyz", timeout=5).status_code == 503


def test_only_alias_uris_are_followed():
    assert parse_alias_uri("models:/defectvlm-adapter@champion") == ("defectvlm-adapter", "champion")
    assert parse_alias_uri("models:/defectvlm-adapter/3") is None
    assert parse_alias_uri("runs/phase3") is None
