"""`defectvlm deploy render` against the KServe CRD schema (subset in tests/serve/data), and the
serving entry point of the training image."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from defectvlm.cluster.images import DOCKERFILES, image
from tests.cluster.test_dockerfiles import instructions
from tests.conftest import KSERVE_SCHEMA, REPO, run_cli, sqlite_registry

SCHEMA = yaml.safe_load(KSERVE_SCHEMA.read_text())
NAME = "defectvlm-adapter"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite registry where @champion is version 2; params pointing at it."""
    cluster = {"gpus": 1, "train_memory": "32Gi"}
    return sqlite_registry(tmp_path_factory.mktemp("registry"), NAME, [{}, {}], {"champion": "2"}, cluster=cluster)


def test_render_pins_the_alias_and_both_variants_validate_against_the_crd_schema(registry, tmp_path):
    out = tmp_path / "deploy"
    code = run_cli(
        "deploy", "render", "--params", registry, "--model", f"models:/{NAME}@champion", "--out", out,
        "--export-uri", "s3://models/defectvlm/v2-merged",
    )  # fmt: skip
    assert code == 0
    service = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    vllm = yaml.safe_load((out / "inferenceservice-vllm.yaml").read_text())
    for document in (service, vllm):
        jsonschema.validate(document, SCHEMA)

    container = service["spec"]["predictor"]["containers"][0]
    assert service["metadata"]["name"] == "defectvlm-adapter-v2"
    assert container["image"] == image("train")
    assert container["command"] == ["defectvlm", "serve"]
    assert container["args"][:3] == ["--model", f"models:/{NAME}/2", "--no-follow"]  # the alias, resolved
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "1"}
    token = next(e for e in container["env"] if e["name"] == "DEFECTVLM_SERVE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "defectvlm-serve", "key": "token"}
    model = vllm["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["storageUri"] == "s3://models/defectvlm/v2-merged"
    kwargs = model["args"][model["args"].index("--mm-processor-kwargs") + 1]
    assert yaml.safe_load(kwargs) == {"min_pixels": 3136, "max_pixels": 200704}  # the training budget, same frame


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("metadata", "name"), "Defect_VLM"),
        (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "port"), 0),
        (("spec", "predictor", "containers", 0, "resources", "limits", "memory"), "lots"),
        (("spec", "predictor", "containers", 0, "imagePullPolicyy"), "Always"),
    ],
)
def test_the_schema_catches_what_the_cluster_would_refuse_or_drop(registry, tmp_path, path, value):
    assert run_cli("deploy", "render", "--params", registry, "--model", f"models:/{NAME}/1", "--out", tmp_path) == 0
    document = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
    broken = copy.deepcopy(document)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_an_alias_missing_from_the_registry_is_a_clear_error(registry, tmp_path, capsys):
    code = run_cli("deploy", "render", "--params", registry, "--model", f"models:/{NAME}@nope", "--out", tmp_path)
    assert code == 1
    assert f"models:/{NAME}@nope: not in the registry" in capsys.readouterr().err


def test_the_training_image_serves_as_a_user_with_port_and_healthcheck():
    dockerfile = instructions(REPO / DOCKERFILES["train"])
    assert ("EXPOSE", "8080") in dockerfile
    healthcheck = next(arguments for keyword, arguments in dockerfile if keyword == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "8080" in healthcheck
    command = next(arguments for keyword, arguments in dockerfile if keyword == "CMD")
    assert yaml.safe_load(command) == ["defectvlm", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert dockerfile[-1] == ("USER", "defectvlm")
