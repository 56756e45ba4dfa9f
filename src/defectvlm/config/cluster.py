"""The cluster sections: the Kubeflow pipeline's shape and multi-node training jobs."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from defectvlm.config.base import AtLeastOne, Float, Key, NonNegative, Section, fail


class TrainJobParams(Section):
    """A Kubeflow Trainer v2 TrainJob per training phase (train.launcher: trainjob): torchrun on every node."""

    num_nodes: Annotated[int, AtLeastOne] = Field(2, description="Training nodes (pods).")
    num_proc_per_node: Annotated[int, AtLeastOne] = Field(8, description="Processes per node (one per GPU).")
    gpus_per_node: Annotated[int, NonNegative] = Field(8, description="GPUs each node requests (resourcesPerNode).")
    cpu_per_node: str = Field("32", description="CPU each node requests (Kubernetes quantity).")
    memory_per_node: str = Field("256Gi", description="Memory each node requests (Kubernetes quantity).")
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the TrainJob runs on.")
    namespace: str = Field("", description="Namespace of the TrainJob; empty means the pipeline step's own namespace.")
    image: str = Field("", description="Trainer image; empty means the pipeline's training image.")
    timeout_hours: Float = Field(
        72.0, description="Fail (and delete the TrainJob) when it has not finished after this long."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainJobParams:
        if self.timeout_hours <= 0:
            fail("timeout_hours", f"must be > 0, got {self.timeout_hours}")
        return self


class ClusterParams(Section):
    """How the Kubeflow pipeline runs on the cluster; read when it is compiled (not pipeline parameters)."""

    image_registry: str = Field(
        "ghcr.io/defectvlm", description="Registry the images are pushed to (defectvlm-data, -train)."
    )
    workspace: str = Field(
        "/workspace", description="Mount path of the shared volume: raw images and checkpoints live here."
    )
    workspace_pvc: str = Field(
        "defectvlm-workspace", description="PersistentVolumeClaim (ReadWriteMany) mounted at workspace."
    )
    secrets: dict[Key, list[str]] = Field(
        {
            "defectvlm-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"],
            "defectvlm-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
        },
        description="Kubernetes secret -> keys exposed to every step as environment variables of the same name.",
    )
    service_account: str = Field(
        "",
        description="Service account of a submitted run; empty: KFP's default. It needs pipelines/rbac.yaml's role.",
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="Accelerator resource of a training step.")
    gpus: int = Field(1, description="GPUs of a training step with train.launcher: local.")
    train_cpu: str = Field("8", description="CPU request of a training or evaluation step.")
    train_memory: str = Field("64Gi", description="Memory request of a training or evaluation step.")
    shm_size: str = Field(
        "16Gi", description="/dev/shm (in-memory emptyDir) of a training step: NCCL and data loaders need it."
    )
    node_selector: dict[Key, str] = Field({}, description="Node labels a training or evaluation step must run on.")
    tolerations: list[dict[Key, str]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations of a training or evaluation step (Kubernetes toleration objects).",
    )
    retries: int = Field(2, description="Retries of a step that reads or writes shared storage.")

    @model_validator(mode="after")
    def _check(self) -> ClusterParams:
        if not self.workspace.startswith("/"):
            fail("workspace", f"must be an absolute path, got {self.workspace!r}")
        if self.gpus < 0 or self.retries < 0:
            fail("gpus", "gpus and retries must be >= 0")
        return self
