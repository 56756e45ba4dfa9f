"""The images, read without a Docker engine: what they copy exists, they install the project
pinned, they run as a non-root user, and the components run in them."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from defectvlm.cluster.images import DATA_IMAGE, DOCKERFILES, TRAIN_IMAGE, image
from defectvlm.steps import STEPS
from tests.conftest import REPO


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def _args(dockerfile: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for kw, arguments in dockerfile if kw == keyword]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_its_ignore_file_lets_in(kind):
    path = REPO / DOCKERFILES[kind]
    dockerfile = instructions(path)
    allowed = {line[1:] for line in (REPO / f"{DOCKERFILES[kind]}.dockerignore").read_text().splitlines()
               if line.startswith("!")}  # fmt: skip
    copied = [src for arguments in _args(dockerfile, "COPY") for src in shlex.split(arguments)[:-1]]
    assert copied and {"src", "configs", "constraints.txt", "pyproject.toml"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert source in allowed, f"{source} is excluded from the build context"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_the_project_pinned_and_runs_as_a_user(kind):
    dockerfile = instructions(REPO / DOCKERFILES[kind])
    pip_installs = [cmd for run in _args(dockerfile, "RUN") for cmd in run.split("&&") if "pip install" in cmd]
    assert any(shlex.split(cmd)[-1] == "." for cmd in pip_installs), "the project is not installed"
    for cmd in pip_installs:
        # every package comes from constraints.txt, except the installers themselves and the optional flash-attn
        assert "-c constraints.txt" in cmd or re.search(r'"(pip|flash-attn)==', cmd), cmd
    assert dockerfile[-1] == ("USER", "defectvlm")
    assert ("WORKDIR", "/app") in dockerfile  # relative paths in params.yaml (configs/deepspeed) resolve here


def test_data_image_is_slim_cpu_python_311():
    dockerfile = instructions(REPO / DOCKERFILES["data"])
    assert _args(dockerfile, "FROM")[0].startswith("python:3.11-slim")
    assert "download.pytorch.org/whl/cpu" in " ".join(_args(dockerfile, "RUN"))


def test_train_image_is_cuda_devel_with_deepspeed_ops_built_and_optional_flash_attention():
    dockerfile = instructions(REPO / DOCKERFILES["train"])
    base = dict(a.split("=", 1) for a in _args(dockerfile, "ARG") if "=" in a)
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-devel-ubuntu\d+\.\d+", base["CUDA_IMAGE"])
    assert _args(dockerfile, "FROM") == ["${CUDA_IMAGE}"]
    runs = " ".join(_args(dockerfile, "RUN"))
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "--no-build-isolation deepspeed" in runs and "python3.11" in runs
    assert base["FLASH_ATTENTION"] == "0" and 'if [ "$FLASH_ATTENTION" = 1 ]' in runs


def test_components_run_in_the_project_images():
    assert (DATA_IMAGE, TRAIN_IMAGE) == (image("data"), image("train"))
    seen = set()
    for name in STEPS:
        component = getattr(importlib.import_module("components"), name)
        container = component.component_spec.implementation.container
        assert container.image in (DATA_IMAGE, TRAIN_IMAGE), name
        assert "pip install" not in " ".join(container.command), name
        seen.add(container.image)
    assert seen == {DATA_IMAGE, TRAIN_IMAGE}
