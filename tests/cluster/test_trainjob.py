"""Multi-node training: the TrainJob manifest, the waiter, and the train step with the trainjob launcher."""

from __future__ import annotations

import json
import os
import re
import signal
from types import SimpleNamespace

import pytest

from defectvlm.cluster import task, trainjob
from defectvlm.cluster.trainjob import TrainJobFailed, build_trainjob, wait_for_trainjob
from defectvlm.config import ClusterParams, TrainJobParams, load_params, params_to_dict

# Field names of trainer.kubeflow.org/v1alpha1 (kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go)
TRAINJOB_SPEC_FIELDS = {
    "runtimeRef",
    "initializer",
    "trainer",
    "runtimePatches",
    "suspend",
    "managedBy",
    "activeDeadlineSeconds",
}
TRAINER_FIELDS = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}
POD_SPEC_PATCH_FIELDS = {
    "serviceAccountName",
    "volumes",
    "initContainers",
    "containers",
    "imagePullSecrets",
    "securityContext",
    "nodeSelector",
    "affinity",
    "tolerations",
    "schedulingGates",
}
ARGV = ["train", "--phase", "2", "--in", "/workspace/runs/r1/sft", "--params", "/workspace/runs/r1/p.yaml"]


def _manifest(**cluster) -> dict:
    params = TrainJobParams(
        num_nodes=4, num_proc_per_node=8, gpus_per_node=8, cpu_per_node="48", memory_per_node="512Gi"
    )
    return build_trainjob(params, ClusterParams(**cluster), "defectvlm-phase2-0a1b2c3d", ARGV, "reg/defectvlm-train:1")


def test_manifest_is_a_v1alpha1_trainjob_on_the_torch_distributed_runtime():
    job = _manifest()
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    spec = job["spec"]
    assert set(spec) <= TRAINJOB_SPEC_FIELDS
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    trainer = spec["trainer"]
    assert set(trainer) <= TRAINER_FIELDS
    assert trainer["image"] == "reg/defectvlm-train:1"
    assert trainer["command"] == ["torchrun", "-m", "defectvlm", *ARGV]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "48", "memory": "512Gi", "nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }
    # torchrun's rendezvous variables are the runtime's to set (the webhook rejects them here)
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert secret_env["AWS_SECRET_ACCESS_KEY"] == {"name": "defectvlm-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert secret_env["MLFLOW_TRACKING_PASSWORD"] == {"name": "defectvlm-mlflow", "key": "MLFLOW_TRACKING_PASSWORD"}
    json.dumps(job)  # plain data, as the API server receives it


def test_trainer_pods_mount_the_workspace_and_shared_memory_and_follow_the_scheduling_params():
    job = _manifest(node_selector={"pool": "h100"}, tolerations=[{"key": "gpu", "operator": "Exists"}])
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert set(pod) <= POD_SPEC_PATCH_FIELDS
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "defectvlm-workspace"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "workspace": "/workspace",
        "dshm": "/dev/shm",
    }
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_trainjob_image_param_overrides_the_pipeline_image():
    params = TrainJobParams(image="my/own:2")
    assert (
        build_trainjob(params, ClusterParams(), "n", ARGV, "reg/defectvlm-train:1")["spec"]["trainer"]["image"]
        == "my/own:2"
    )


class ApiError(Exception):
    """What kubernetes' ApiException carries that the code reads: the HTTP status."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeCustomObjects:
    """CustomObjectsApi's TrainJob calls: one namespace's jobs by name (create answers 409 for
    a taken name, as the API server does); `get` returns the scripted statuses one poll at a time."""

    def __init__(self, statuses: list[dict], fail_get_at: int | None = None):
        self.statuses = statuses
        self.fail_get_at = fail_get_at
        self.gets = 0
        self.jobs: dict[str, dict] = {}
        self.created = []
        self.deleted = []
        self.patches = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiError(409)
        self.jobs[name] = json.loads(json.dumps(body))
        self.created.append((namespace, name))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if self.gets == self.fail_get_at:
            raise ApiError(500)
        status = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        return {**self.jobs.get(name, {"metadata": {"name": name, "namespace": namespace}}), "status": status}

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.patches.append(body)
        self.jobs[name]["metadata"].update(body["metadata"])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.jobs.pop(name, None)
        self.deleted.append((namespace, name))


class FakeCore:
    """CoreV1Api's pod listing and log streaming."""

    def __init__(self, pods: dict[str, list[bytes]], ready_after: int = 1):
        self.pods = pods
        self.ready_after = ready_after
        self.lists = 0
        self.selectors = []

    def list_namespaced_pod(self, namespace, label_selector):
        self.selectors.append(label_selector)
        self.lists += 1
        phase = "Running" if self.lists > self.ready_after else "Pending"
        items = [
            SimpleNamespace(metadata=SimpleNamespace(name=n), status=SimpleNamespace(phase=phase)) for n in self.pods
        ]
        return SimpleNamespace(items=items)

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        assert container == "node" and follow and not _preload_content
        return iter(self.pods[name])


def _condition(kind: str, message: str = "") -> dict:
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": kind, "status": "True", "message": message}]}


def _wait(custom, core, timeout_s=100.0):
    now = [0.0]
    lines = []
    job = wait_for_trainjob(
        custom,
        core,
        "tj",
        "ml",
        timeout_s,
        poll_s=10,
        log=lines.append,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    return job, sorted(lines)


def test_waiter_streams_every_trainer_pods_log_and_returns_when_complete():
    custom = FakeCustomObjects(
        [{}, {"conditions": [{"type": "Created", "status": "True"}]}, {}, _condition("Complete")]
    )
    core = FakeCore({"tj-node-0-0": [b"step=1 loss=2.0\n", b"done\n"], "tj-node-0-1": [b"rank 1 ok\n"]})
    job, lines = _wait(custom, core)
    assert job["status"]["conditions"][-1]["type"] == "Complete" and custom.gets == 4
    assert lines == ["[tj-node-0-0] done", "[tj-node-0-0] step=1 loss=2.0", "[tj-node-0-1] rank 1 ok"]
    assert core.selectors[0] == "jobset.sigs.k8s.io/jobset-name=tj,jobset.sigs.k8s.io/replicatedjob-name=node"


def test_waiter_fails_the_step_when_the_trainjob_fails():
    custom = FakeCustomObjects([{}, _condition("Failed", "node-0-1 OOMKilled")])
    with pytest.raises(TrainJobFailed, match="ml/tj failed: node-0-1 OOMKilled"):
        _wait(custom, FakeCore({"tj-node-0-0": [b"CUDA out of memory\n"]}, ready_after=0))
    assert not custom.deleted


def test_waiter_deletes_the_trainjob_after_the_timeout():
    custom = FakeCustomObjects([{}])
    with pytest.raises(TrainJobFailed, match="did not finish in 30 s"):
        _wait(custom, FakeCore({}), timeout_s=30)
    assert custom.deleted == [("ml", "tj")] and custom.gets == 5  # polls at 0, 10, 20, 30, then 40 > 30


def test_train_step_with_the_trainjob_launcher_runs_the_phase_command_on_the_workspace(tmp_path, monkeypatch):
    """What the trainer pods would write (best/, metrics, checkpoints) becomes the step's adapter, minus checkpoints."""
    launched = []

    def fake_run_trainjob(params, cluster, phase, argv, image, pipeline_run):
        launched.append((params, phase, argv, image, pipeline_run))
        out = tmp_path / "ws" / "runs" / "job1" / f"phase{phase}"
        (out / "best").mkdir(parents=True)
        (out / "best" / "adapter_model.safetensors").write_bytes(b"w")
        (out / "checkpoints").mkdir()
        (out / "metrics.json").write_text(json.dumps({"phase": phase, "enabled": True, "steps": 3}))

    monkeypatch.setattr(trainjob, "run_trainjob", fake_run_trainjob)
    sft = tmp_path / "sft-artifact"
    sft.mkdir()
    (sft / "train.jsonl").write_text("{}\n")
    phase1 = tmp_path / "phase1-artifact"
    (phase1 / "best").mkdir(parents=True)
    sections = params_to_dict(task.params_from_sections({}))
    train = {**sections["train"], "launcher": "trainjob"}
    cluster = {**sections["cluster"], "workspace": str(tmp_path / "ws"), "image_registry": "reg.local"}
    adapter = SimpleNamespace(path=str(tmp_path / "adapter"), metadata={})

    task.run_task(
        "train_phase2",
        {
            **{name: sections[name] for name in ("model", "sft", "tracking")},
            "train": train,
            "trainjob": {**sections["trainjob"], "num_nodes": 3.0},  # KFP hands numbers over as floats
            "cluster": cluster,
            "job_id": "job1",
            "data_version": "",
            "lineage": {},
            "conversations": SimpleNamespace(path=str(sft)),
            "phase1": SimpleNamespace(path=str(phase1)),
            "adapter": adapter,
        },
    )

    ((params, phase, argv, image, pipeline_run),) = launched
    assert pipeline_run == "job1"  # the TrainJob is named after the pipeline run
    run = tmp_path / "ws" / "runs" / "job1"
    assert params.num_nodes == 3 and phase == 2 and image == "reg.local/defectvlm-train:0.1.0"
    params_file = run / "params_train_phase2.yaml"
    assert argv == ["train", "--phase", "2", "--in", str(run / "sft"), "--params", str(params_file)]
    assert (run / "sft" / "train.jsonl").exists() and (run / "phase1" / "best").is_dir()
    written = load_params(params_file)  # what the trainer pods read
    assert written.train.output_dir == str(run) and written.train.launcher == "trainjob"
    assert adapter.metadata["steps"] == 3
    adapter = tmp_path / "adapter"
    assert (adapter / "best" / "adapter_model.safetensors").exists() and not (adapter / "checkpoints").exists()


def test_section_numbers_from_kfp_come_back_as_ints():
    params = task.params_from_sections({"train": {"batch_size": 2.0, "phase1": {"max_steps": 5.0, "epochs": 2.0}}})
    assert params.train.batch_size == 2 and isinstance(params.train.batch_size, int)
    assert isinstance(params.train.phase1.max_steps, int) and params.train.phase1.epochs == 2.0


def test_trainjob_name_is_the_same_for_a_pipeline_run_and_phase_and_a_valid_label():
    name = trainjob.trainjob_name("4f1c9a2e-77b0-4e3b-9d8a-0b7a1c2d3e4f", 2)
    assert name == trainjob.trainjob_name("4f1c9a2e-77b0-4e3b-9d8a-0b7a1c2d3e4f", 2)
    assert name != trainjob.trainjob_name("4f1c9a2e-77b0-4e3b-9d8a-0b7a1c2d3e4f", 3)
    assert name != trainjob.trainjob_name("5f1c9a2e-77b0-4e3b-9d8a-0b7a1c2d3e4f", 2)
    for run in ("4f1c9a2e-77b0-4e3b-9d8a-0b7a1c2d3e4f", "Run_With.ODD/chars" * 9, "---"):
        label = trainjob.trainjob_name(run, 1)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", label) and len(label) <= 63, label


POD_ENV = {"KFP_POD_NAME": "finetune-abc-train-1234", "KFP_POD_UID": "0d7c-uid"}


@pytest.fixture
def in_pod(tmp_path, monkeypatch):
    """This process as the train step's pod in namespace `ml`, named by the downward API."""
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("ml\n")
    monkeypatch.setattr(trainjob, "SERVICE_ACCOUNT_NAMESPACE", namespace_file)
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(trainjob.time, "sleep", lambda s: None)


def _run(custom, core):
    params = TrainJobParams(timeout_hours=1.0)
    return trainjob.run_trainjob(params, ClusterParams(), 1, ARGV, "img", "run-42", apis=(custom, core))


def test_a_retried_step_attaches_to_the_running_trainjob_instead_of_starting_a_second_writer(in_pod):
    name = trainjob.trainjob_name("run-42", 1)
    earlier_owner = {"apiVersion": "v1", "kind": "Pod", "name": "try-1", "uid": "uid-1", "controller": False}
    custom = FakeCustomObjects([{}, {}, _condition("Complete")])
    custom.jobs[name] = {"metadata": {"name": name, "ownerReferences": [earlier_owner]}}  # the first try's job

    job = _run(custom, FakeCore({}))
    assert not custom.created  # one job, one writer of runs/<run>/phase1/checkpoints
    assert job["status"]["conditions"][-1]["type"] == "Complete" and not custom.deleted
    (patch,) = custom.patches  # the retry's pod owns it too, so it lives while either pod does
    assert [o["uid"] for o in patch["metadata"]["ownerReferences"]] == ["uid-1", "0d7c-uid"]


def test_a_retry_after_a_failed_trainjob_replaces_it(in_pod):
    name = trainjob.trainjob_name("run-42", 1)
    custom = FakeCustomObjects([_condition("Failed", "OOMKilled"), {}, _condition("Complete")])
    custom.jobs[name] = {"metadata": {"name": name}}
    custom.created.append(("ml", name))
    _run(custom, FakeCore({}))
    assert custom.created == [("ml", name), ("ml", name)] and custom.deleted == [("ml", name)]


def test_the_manifest_is_owned_by_the_steps_pod_when_the_downward_api_names_it(in_pod):
    custom = FakeCustomObjects([_condition("Complete")])
    _run(custom, FakeCore({}))
    (job,) = custom.jobs.values()
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "finetune-abc-train-1234", "uid": "0d7c-uid", "controller": False}
    ]
    assert trainjob.owner_reference("ml", "other-namespace", POD_ENV) is None  # owners must share the namespace
    assert trainjob.owner_reference("ml", "ml", {}) is None


@pytest.mark.parametrize("how", ["interrupt", "sigterm", "api-error"])
def test_cancellation_or_a_polling_error_deletes_the_trainjob(in_pod, monkeypatch, how):
    custom = FakeCustomObjects([{}], fail_get_at=2 if how == "api-error" else None)
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 2 and how == "interrupt":
            raise KeyboardInterrupt
        if len(polls) == 2 and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainjob.time, "sleep", sleep)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt if how != "api-error" else ApiError):
        _run(custom, FakeCore({}))
    assert custom.deleted == [("ml", trainjob.trainjob_name("run-42", 1))] and not custom.jobs
    assert signal.getsignal(signal.SIGTERM) is previous
