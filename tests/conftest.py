from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from defectvlm.cli import main

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """`make test` runs one pytest-xdist worker per core: each computes on one thread, and so do the
    commands it starts (two workers of two threads each would fight over the two cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not key.endswith("label_map"):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# What the tests change in the repo's params.yaml before their own overrides: every region of an
# image in one conversation (the general case; the demo's one-region prompts multiply the samples
# by five, and the tests that run the demo's setting say so: test_dvc_pipeline, test_sft).
TEST_PARAMS = {"sft": {"regions_per_prompt": 0}}


def repo_params() -> dict:
    """The repo's params.yaml as the tests use it (TEST_PARAMS merged in)."""
    return deep_merge(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), TEST_PARAMS)


def write_params(path: Path, overrides: dict) -> Path:
    """params.yaml = the repo's params.yaml with TEST_PARAMS, then `overrides`, merged in (nested sections too)."""
    params = deep_merge(repo_params(), overrides)
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def prepare_sft(params: Path, out: Path) -> Path:
    """ingest -> split -> regions -> build-sft through the CLI into out/01..04; returns out/04."""
    previous = None
    for step, folder in [("ingest", "01"), ("split", "02"), ("regions", "03"), ("build-sft", "04")]:
        args = [step, "--params", params, "--out", out / folder]
        args += ["--quiet"] if step == "ingest" else ["--in", out / previous]
        assert run_cli(*args) == 0
        previous = folder
    return out / "04"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def params_file(tmp_path: Path):
    def make(**sections: dict) -> Path:
        return write_params(tmp_path / "params.yaml", sections)

    return make


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    raw = root / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 16, "--n-normal", 16, "--seed", 5) == 0
    params = write_params(
        root / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    return prepare_sft(params, root)


KSERVE_SCHEMA = REPO / "tests/serve/data/kserve_inferenceservice_v1beta1.schema.yaml"  # a subset of the CRD's


def sqlite_registry(
    folder: Path, name: str, version_tags: list[dict], aliases: dict[str, str] | None = None, **sections: dict
) -> Path:
    """A sqlite MLflow registry in `folder` holding one version of `name` per entry of
    `version_tags` (that version's tags), with `aliases` set; returns a params.yaml pointing at
    it, `sections` merged in."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(name)
    for tags in version_tags:
        version = client.create_model_version(name, (folder / "adapter").as_uri()).version
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    for alias, version in (aliases or {}).items():
        client.set_registered_model_alias(name, alias, version)
    tracking = {**sections.pop("tracking", {}), "uri": uri}
    return write_params(folder / "params.yaml", {"tracking": tracking, **sections})
