"""Multi-node training as a Kubeflow Trainer v2 TrainJob (`train.launcher: trainjob`).

The TrainJob runs on the `torch-distributed` ClusterTrainingRuntime: the runtime starts
`numNodes` pods and sets torchrun's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT, so the trainer command is plain
`torchrun -m defectvlm train --phase N ...`. Field names follow trainer.kubeflow.org/v1alpha1
(pkg/apis/trainer/v1alpha1/trainjob_types.go); the workspace volume, /dev/shm and scheduling
go in through `spec.runtimePatches`.

One TrainJob per pipeline run and phase, named from both: a retried step finds the job it
started before and follows it instead of starting a second writer into the same checkpoint
folder. The job is owned by the step's pod (KFP's downward-API KFP_POD_NAME / KFP_POD_UID),
so Kubernetes removes it with the pod, and the waiter deletes it when it stops following
for any reason other than the job's own end (cancellation, SIGTERM, timeout, a polling error).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from defectvlm.config import ClusterParams, TrainJobParams

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the runtime's trainer ReplicatedJob and its container
PATCH_MANAGER = "defectvlm.io/pipeline"
WORKSPACE_VOLUME, SHM_VOLUME = "workspace", "dshm"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobFailed(RuntimeError):
    """The TrainJob failed, or did not finish in time."""


def trainjob_name(pipeline_run: str, phase: int) -> str:
    """The phase's TrainJob name for this pipeline run: the same on every retry, a valid
    DNS-1123 label (<= 63 characters) whatever the run id looks like."""
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_run.lower())[:36].strip("-")
    digest = hashlib.sha256(f"{pipeline_run}\0{phase}".encode()).hexdigest()[:8]
    return "-".join(part for part in ("defectvlm", slug, f"p{phase}", digest) if part)


def owner_reference(job_namespace: str, pod_namespace: str | None, env=os.environ) -> dict | None:
    """An ownerReference to the step's pod, when its name and uid are known (downward API) and
    it lives in the job's namespace (Kubernetes refuses owners from another namespace)."""
    name = env.get("KFP_POD_NAME") or env.get("POD_NAME")
    uid = env.get("KFP_POD_UID") or env.get("POD_UID")
    if not (name and uid) or pod_namespace != job_namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "controller": False}


def build_trainjob(
    trainjob: TrainJobParams,
    cluster: ClusterParams,
    name: str,
    argv: list[str],
    image: str,
    owner: dict | None = None,
) -> dict:
    """The TrainJob manifest that runs `defectvlm <argv>` under torchrun on every node."""
    gpu = {cluster.accelerator_type: str(trainjob.gpus_per_node)} if trainjob.gpus_per_node else {}
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}] + [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for secret, keys in cluster.secrets.items()
        for key in keys
    ]
    volumes = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}}]
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if cluster.workspace_pvc:
        volumes.append({"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": cluster.workspace_pvc}})
        mounts.append({"name": WORKSPACE_VOLUME, "mountPath": cluster.workspace})
    pod_spec = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
    if cluster.node_selector:
        pod_spec["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in cluster.tolerations]
    metadata = {"name": name, "labels": {"app.kubernetes.io/part-of": "defectvlm"}}
    if owner:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": trainjob.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": {
                "image": trainjob.image or image,
                "command": ["torchrun", "-m", "defectvlm", *argv],
                "numNodes": trainjob.num_nodes,
                "numProcPerNode": trainjob.num_proc_per_node,
                "resourcesPerNode": {
                    "requests": {"cpu": trainjob.cpu_per_node, "memory": trainjob.memory_per_node, **gpu},
                    "limits": gpu,
                },
                "env": env,
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": NODE, "template": {"spec": {"template": {"spec": pod_spec}}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def trainer_pods_selector(name: str) -> str:
    """Label selector of the TrainJob's trainer pods (its JobSet's `node` ReplicatedJob)."""
    return f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE}"


def finished(job: dict) -> tuple[str, str] | None:
    """('Complete' | 'Failed', message) once the job has finished, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("message") or condition.get("reason") or ""
    return None


def ensure_trainjob(custom, namespace: str, manifest: dict, log: Callable[[str], None] = print) -> str:
    """Create the TrainJob, or attach to the one an earlier try of this step created
    ('created' / 'attached' / 'replaced'). A job that failed has stopped writing: it is
    replaced so that the retry trains (resuming from the last checkpoint) instead of
    reporting the old failure. An attached job also gets this pod as an owner."""
    name = manifest["metadata"]["name"]
    if _create(custom, namespace, manifest):
        return "created"
    existing = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    state = finished(existing)
    if state is not None and state[0] == "Failed":
        log(f"TrainJob {namespace}/{name} failed before ({state[1]}): replacing it")
        _delete(custom, name, namespace)
        for _ in range(60):  # deletion passes through the job's finalizers
            if _create(custom, namespace, manifest):
                return "replaced"
            time.sleep(2)
        raise TrainJobFailed(f"TrainJob {namespace}/{name} is still being deleted: retry the step")
    owners = (existing.get("metadata") or {}).get("ownerReferences") or []
    mine = manifest["metadata"].get("ownerReferences") or []
    added = [o for o in mine if o["uid"] not in {e.get("uid") for e in owners}]
    if added:
        patch = {"metadata": {"ownerReferences": owners + added}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
    return "attached"


def _create(custom, namespace: str, manifest: dict) -> bool:
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except Exception as exc:
        if getattr(exc, "status", None) == 409:  # kubernetes ApiException: the name is taken
            return False
        raise
    return True


def _delete(custom, name: str, namespace: str) -> None:
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:
        if getattr(exc, "status", None) != 404:
            raise


def wait_for_trainjob(
    custom,
    core,
    name: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 30.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> dict:
    """Poll the TrainJob until it completes, streaming each trainer pod's log as it starts.

    `custom` is a kubernetes CustomObjectsApi, `core` a CoreV1Api (or objects with the same
    methods). Raises TrainJobFailed when the job fails (the job is kept to inspect). Whatever
    else ends the wait (timeout_s, an interrupt, an API error) deletes the job first."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    deadline = clock() + timeout_s
    streams: dict[str, threading.Thread] = {}
    ended = False
    try:
        while True:
            job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            for pod in core.list_namespaced_pod(namespace, label_selector=trainer_pods_selector(name)).items:
                if pod.metadata.name not in streams and pod.status.phase in ("Running", "Succeeded", "Failed"):
                    thread = threading.Thread(
                        target=_stream_log, args=(core, pod.metadata.name, namespace, log), daemon=True
                    )
                    thread.start()
                    streams[pod.metadata.name] = thread
            result = finished(job)
            if result is not None:
                ended = True
                for thread in streams.values():
                    thread.join(timeout=60)
                state, message = result
                if state == "Failed":
                    raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {message}")
                return job
            if clock() > deadline:
                raise TrainJobFailed(f"TrainJob {namespace}/{name} did not finish in {timeout_s:.0f} s: deleted")
            sleep(poll_s)
    finally:
        if not ended:
            _delete(custom, name, namespace)
            log(f"deleted TrainJob {namespace}/{name}")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cancelled run's pod being stopped) raises KeyboardInterrupt, so that the
    waiter's cleanup runs; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stream_log(core, pod: str, namespace: str, log: Callable[[str], None]) -> None:
    response = core.read_namespaced_pod_log(pod, namespace, container=NODE, follow=True, _preload_content=False)
    for line in response:
        text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        log(f"[{pod}] {text.rstrip()}")


def kubernetes_apis():
    """(CustomObjectsApi, CoreV1Api) for the cluster this pod runs in (or the kubeconfig's)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def run_trainjob(
    trainjob: TrainJobParams,
    cluster: ClusterParams,
    phase: int,
    argv: list[str],
    image: str,
    pipeline_run: str,
    apis=None,
) -> dict:
    """Create (or, on a retry, attach to) the phase's TrainJob and wait for it."""
    custom, core = apis or kubernetes_apis()
    pod_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else None
    namespace = trainjob.namespace or pod_namespace
    if not namespace:
        raise TrainJobFailed("trainjob.namespace is empty and this is not a pod: set trainjob.namespace")
    name = trainjob_name(pipeline_run, phase)
    manifest = build_trainjob(trainjob, cluster, name, argv, image, owner_reference(namespace, pod_namespace))

    def log(text: str) -> None:
        print(text, flush=True)

    with _terminate_as_interrupt():
        try:
            how = ensure_trainjob(custom, namespace, manifest, log)
        except BaseException:
            _delete(custom, name, namespace)
            raise
        log(f"{how} TrainJob {namespace}/{name}: {trainjob.num_nodes} nodes x {trainjob.num_proc_per_node}")
        return wait_for_trainjob(custom, core, name, namespace, trainjob.timeout_hours * 3600, log=log)
