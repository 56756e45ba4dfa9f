"""pipelines/finetune.yaml: committed, current, and carrying what the cluster needs."""

from __future__ import annotations

import os
import subprocess
import sys

from defectvlm.cluster.images import image
from defectvlm.cluster.pipeline import PACKAGE, compile_pipeline
from defectvlm.config import load_params
from tests.cluster.conftest import compile_to, executor_label, tasks_by_step
from tests.conftest import REPO

DATA_STEPS = ("scan_labels", "ingest", "split", "regions", "sft")
TRAIN_STEPS = ("train_phase1", "train_phase2", "train_phase3")
MODEL_STEPS = (
    "evaluate",
    "evaluate_cascade",
    "predict",
    "export",
)  # they run a trained model: the training image and its GPU


def test_committed_pipeline_is_a_fresh_compile(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "finetune.yaml")
    committed = (REPO / PACKAGE).read_text(encoding="utf-8")
    assert committed == fresh.read_text(encoding="utf-8"), (
        "pipelines/finetune.yaml is stale: defectvlm pipeline compile"
    )


def test_training_and_evaluation_request_a_gpu_memory_and_shared_memory(compiled):
    spec, k8s = compiled
    tasks = tasks_by_step(spec)
    for step in (*TRAIN_STEPS, *MODEL_STEPS):
        label = executor_label(spec, tasks[step])
        resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        assert resources["resourceMemoryRequest"] == "64Gi" and resources["resourceCpuRequest"] == "8"
        assert k8s[label]["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
        ]
        assert k8s[label]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    for step in (*DATA_STEPS, "register", "deploy"):
        label = executor_label(spec, tasks[step])
        assert "resources" not in spec["deploymentSpec"]["executors"][label]["container"], step


def test_every_step_gets_the_secrets_and_the_workspace_volume(compiled):
    spec, k8s = compiled
    for step, task in tasks_by_step(spec).items():
        config = k8s[executor_label(spec, task)]
        env = {(s["secretName"], k["envVar"]) for s in config["secretAsEnv"] for k in s["keyToEnv"]}
        assert {("defectvlm-s3", "AWS_SECRET_ACCESS_KEY"), ("defectvlm-mlflow", "MLFLOW_TRACKING_PASSWORD")} <= env, (
            step
        )
        mounts = [(m["constant"], m["mountPath"]) for m in config["pvcMount"]]
        assert mounts == [("defectvlm-workspace", "/workspace")], step


def test_io_steps_retry_and_mlflow_steps_are_never_served_from_cache(compiled):
    spec, _ = compiled
    tasks = tasks_by_step(spec)
    for step in (*DATA_STEPS, *MODEL_STEPS, "register", "deploy"):
        assert tasks[step]["retryPolicy"]["maxRetryCount"] == 2, step
    for step in TRAIN_STEPS:
        assert "retryPolicy" not in tasks[step], step  # a failed GPU run is not retried blindly
    for step in ("evaluate", "register", "export", "deploy"):  # they write to (or read tags of) the registry
        assert not tasks[step]["cachingOptions"], step
    # the data steps are cached by the data version they are given
    for step in ("scan_labels", "ingest"):
        assert tasks[step]["cachingOptions"] == {"enableCache": True}
        assert tasks[step]["inputs"]["parameters"]["data_version"] == {"componentInputParameter": "data_version"}


def test_steps_run_in_the_project_images(compiled):
    spec, _ = compiled
    for step, task in tasks_by_step(spec).items():
        kind = "train" if step in (*TRAIN_STEPS, *MODEL_STEPS) else "data"
        container = spec["deploymentSpec"]["executors"][executor_label(spec, task)]["container"]
        assert container["image"] == image(kind), step
        assert "pip install" not in " ".join(container["command"]), step  # nothing installed at run time


def test_trainjob_launcher_frees_the_step_pods_gpu_and_cluster_params_shape_the_tasks(tmp_path, monkeypatch):
    spec, k8s = compile_to(
        tmp_path,
        monkeypatch,
        train={"launcher": "trainjob"},
        cluster={"gpus": 4, "node_selector": {"pool": "h100"}, "image_registry": "registry.local/ml"},
    )
    tasks = tasks_by_step(spec)
    for step in TRAIN_STEPS:
        container = spec["deploymentSpec"]["executors"][executor_label(spec, tasks[step])]["container"]
        assert "resources" not in container and container["image"] == image("train", "registry.local/ml")
    label = executor_label(spec, tasks["evaluate"])
    assert spec["deploymentSpec"]["executors"][label]["container"]["resources"]["accelerator"]["resourceCount"] == "4"
    assert k8s[label]["nodeSelector"] == {"labels": {"pool": "h100"}}


def test_compile_works_from_any_directory(tmp_path):
    """The pipeline is built inside the package: no repository folder on the import path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO / "src")  # the package alone (an installed one: the same)
    out = tmp_path / "elsewhere.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectvlm",
            "pipeline",
            "compile",
            "--params",
            str(REPO / "params.yaml"),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == (REPO / PACKAGE).read_text(encoding="utf-8")
