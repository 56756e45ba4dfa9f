"""The compiled pipeline, shared by the cluster tests."""

from __future__ import annotations

import pytest
import yaml

from defectvlm.cluster.pipeline import compile_pipeline
from defectvlm.config import load_params
from tests.conftest import REPO, write_params


def compile_to(tmp_path, monkeypatch, **sections: dict) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes executor configs) compiled from the repo's params.yaml with
    `sections` merged in."""
    monkeypatch.chdir(REPO)
    params = load_params(write_params(tmp_path / "params.yaml", sections))
    out = compile_pipeline(params, tmp_path / "finetune.yaml")
    spec, platform = yaml.safe_load_all(out.read_text(encoding="utf-8"))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return compile_to(tmp_path_factory.mktemp("compiled"), monkeypatch)


def tasks_by_step(spec: dict) -> dict[str, dict]:
    """DAG tasks keyed by their display name (the dvc.yaml stage name)."""
    return {task["taskInfo"]["name"]: task for task in spec["root"]["dag"]["tasks"].values()}


def executor_label(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]
