"""The cluster pipeline's `deploy` task: after `register` and `export`, it renders the KServe
InferenceServices of the version the run registered (the code of `defectvlm deploy render`), and
under registry.require_export_parity refuses a version whose export's parity check is missing or
failed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest
import yaml

from defectvlm.cluster.task import run_task
from defectvlm.config import load_params, params_to_dict
from defectvlm.errors import StepFailure
from defectvlm.steps import STEPS
from defectvlm.tracking.registry import PARITY_TAG
from tests.cluster.conftest import tasks_by_step
from tests.conftest import KSERVE_SCHEMA, run_cli, sqlite_registry

SCHEMA = yaml.safe_load(KSERVE_SCHEMA.read_text())
NAME = "weld-adapter"
PASSED = {"max_abs_diff": 3e-7, "tolerance": 1e-4, "passed": True}
FAILED = {"max_abs_diff": 0.02, "tolerance": 1e-4, "passed": False}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 without a parity record, v2 whose export failed it, v3 whose export passed it."""
    tags = [{PARITY_TAG: json.dumps(record)} if record else {} for record in (None, FAILED, PASSED)]
    registry = {"model_name": NAME, "require_export_parity": True}
    return sqlite_registry(tmp_path_factory.mktemp("registry"), NAME, tags, registry=registry)


def deploy_task(params_file, version: str, tmp_path, require: bool = True) -> SimpleNamespace:
    """Run the deploy task as its component does, on `register`'s artifact naming `version`."""
    registration = tmp_path / "registration"
    registration.mkdir(exist_ok=True)
    (registration / "registration.json").write_text(json.dumps({"name": NAME, "version": version}))
    values = params_to_dict(load_params(params_file))
    values["registry"]["require_export_parity"] = require
    deployment = SimpleNamespace(path=str(tmp_path / "deployment"), metadata={})
    arguments = {section: values[section] for section in STEPS["deploy"].sections}
    arguments.update(
        registration=SimpleNamespace(path=str(registration)),
        exported=SimpleNamespace(path=str(tmp_path / "exported"), uri="s3://kfp/run-7/export/exported"),
        deployment=deployment,
    )
    run_task("deploy", arguments)
    return deployment


def test_the_task_renders_the_registered_version_and_the_export_artifact(registry, tmp_path):
    deployment = deploy_task(registry, "3", tmp_path)
    service = yaml.safe_load((tmp_path / "deployment" / "inferenceservice.yaml").read_text())
    vllm = yaml.safe_load((tmp_path / "deployment" / "inferenceservice-vllm.yaml").read_text())
    for document in (service, vllm):
        jsonschema.validate(document, SCHEMA)
    assert service["spec"]["predictor"]["containers"][0]["args"][:2] == ["--model", f"models:/{NAME}/3"]
    assert service["metadata"]["name"] == "weld-adapter-v3"
    assert vllm["spec"]["predictor"]["model"]["storageUri"] == "s3://kfp/run-7/export/exported"
    assert deployment.path == str(tmp_path / "deployment")


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("1", f"models:/{NAME}/1 is not deployed: no export parity check recorded (run `defectvlm export"),
        ("2", f"models:/{NAME}/2 is not deployed: its export failed the parity check (max |dP| 0.02 > 0.0001"),
    ],
)
def test_a_version_without_a_passed_parity_check_is_refused(registry, tmp_path, capsys, version, message):
    with pytest.raises(StepFailure, match=message.replace("|", r"\|").replace("(", r"\(")):
        deploy_task(registry, version, tmp_path)
    assert not (tmp_path / "deployment" / "inferenceservice.yaml").exists()
    # `defectvlm deploy render` is the same code: the same refusal, exit 1 and no traceback
    code = run_cli("deploy", "render", "--params", registry, "--model", f"models:/{NAME}/{version}", "--out", tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "inferenceservice.yaml").exists()


def test_without_the_requirement_any_version_is_rendered(registry, tmp_path):
    deploy_task(registry, "1", tmp_path, require=False)
    service = yaml.safe_load((tmp_path / "deployment" / "inferenceservice.yaml").read_text())
    assert service["spec"]["predictor"]["containers"][0]["args"][:2] == ["--model", f"models:/{NAME}/1"]


def test_the_compiled_deploy_task_follows_export_and_gets_the_registry_section(compiled):
    spec, _ = compiled
    task = tasks_by_step(spec)["deploy"]
    assert set(task["dependentTasks"]) == {"export", "register"}
    artifacts = task["inputs"]["artifacts"]
    assert artifacts["exported"]["taskOutputArtifact"] == {"outputArtifactKey": "exported", "producerTask": "export"}
    assert artifacts["registration"]["taskOutputArtifact"]["producerTask"] == "register"
    parameters = task["inputs"]["parameters"]
    assert parameters["registry"] == {"componentInputParameter": "registry"}  # require_export_parity travels
    assert "runtimeValue" in parameters["cluster"]  # compiled in from params.yaml's cluster section
    assert task["cachingOptions"] == {}  # the registry's tags change: never served from cache
