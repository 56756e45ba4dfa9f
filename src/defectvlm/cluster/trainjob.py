"""Multi-node training as a Kubeflow Trainer v2 TrainJob (`train.launcher: trainjob`).

The TrainJob runs on the `torch-distributed` ClusterTrainingRuntime: the runtime starts
`numNodes` pods and sets torchrun's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT, so the trainer command is plain
`torchrun -m defectvlm train --phase N ...`. Field names follow trainer.kubeflow.org/v1alpha1
(pkg/apis/trainer/v1alpha1/trainjob_types.go); the workspace volume, /dev/shm and scheduling
go in through `spec.runtimePatches`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from defectvlm.config import ClusterParams, TrainJobParams

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the runtime's trainer ReplicatedJob and its container
PATCH_MANAGER = "defectvlm.io/pipeline"
WORKSPACE_VOLUME, SHM_VOLUME = "workspace", "dshm"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobFailed(RuntimeError):
    """The TrainJob failed, or did not finish in time."""


def build_trainjob(trainjob: TrainJobParams, cluster: ClusterParams, name: str, argv: list[str], image: str) -> dict:
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
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "defectvlm"}},
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


def wait_for_trainjob(
    custom,
    core,
    name: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 30.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll the TrainJob until it completes, streaming each trainer pod's log as it starts.

    `custom` is a kubernetes CustomObjectsApi, `core` a CoreV1Api (or objects with the same
    methods). Raises TrainJobFailed when the job fails, or deletes it and raises after timeout_s."""
    deadline = clock() + timeout_s
    streams: dict[str, threading.Thread] = {}
    while True:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        for pod in core.list_namespaced_pod(namespace, label_selector=trainer_pods_selector(name)).items:
            if pod.metadata.name not in streams and pod.status.phase in ("Running", "Succeeded", "Failed"):
                thread = threading.Thread(target=_stream_log, args=(core, pod.metadata.name, namespace, log))
                thread.start()
                streams[pod.metadata.name] = thread
        result = finished(job)
        if result is not None:
            for thread in streams.values():
                thread.join(timeout=60)
            state, message = result
            if state == "Failed":
                raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {message}")
            return job
        if clock() > deadline:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise TrainJobFailed(f"TrainJob {namespace}/{name} did not finish in {timeout_s:.0f} s: deleted")
        sleep(poll_s)


def _stream_log(core, pod: str, namespace: str, log: Callable[[str], None]) -> None:
    response = core.read_namespaced_pod_log(pod, namespace, container=NODE, follow=True, _preload_content=False)
    for line in response:
        text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        log(f"[{pod}] {text.rstrip()}")


def run_trainjob(trainjob: TrainJobParams, cluster: ClusterParams, phase: int, argv: list[str], image: str) -> dict:
    """Create the phase's TrainJob in the cluster this pod runs in and wait for it."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = trainjob.namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    name = f"defectvlm-phase{phase}-{uuid.uuid4().hex[:8]}"
    custom = client.CustomObjectsApi()
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, build_trainjob(trainjob, cluster, name, argv, image)
    )
    print(f"created TrainJob {namespace}/{name}: {trainjob.num_nodes} nodes x {trainjob.num_proc_per_node}", flush=True)
    return wait_for_trainjob(
        custom, client.CoreV1Api(), name, namespace, trainjob.timeout_hours * 3600, log=lambda s: print(s, flush=True)
    )
