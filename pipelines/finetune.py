"""The fine-tuning pipeline: dvc.yaml's stages as KFP tasks, with the same commands and parameters.

Pipeline parameters are generated from `defectvlm.config.Params`: one dict parameter per
params.yaml section (data, labels, ..., trainjob) whose default is that section of the params
file the pipeline is built from, plus `data_version` and `lineage` (the dvc.lock / .dvc files of
that version, which the training, evaluation and registration steps log). Each task gets exactly the sections its
step reads (`defectvlm.cluster.steps.STEPS`), so a changed section re-runs only the steps that
read it and the steps after them. The `cluster` section is not a parameter: it shapes the
compiled pipeline (images, GPUs, volumes, secrets, scheduling).
"""

from __future__ import annotations

import inspect

from kfp import dsl, kubernetes

from components.evaluate import evaluate
from components.ingest import ingest
from components.regions import regions
from components.register import register
from components.scan_labels import scan_labels
from components.sft import sft
from components.split import split
from components.train import train_phase
from components.train_detector import train_detector
from defectvlm.cluster.images import image
from defectvlm.cluster.steps import RUNTIME_SECTIONS, STEPS
from defectvlm.config import ClusterParams, Params, field_docs, params_to_dict

NAME = "defectvlm-finetune"
TRAIN_STEPS = ("train_phase1", "train_phase2", "train_phase3")
# retried on failure
IO_STEPS = ("scan_labels", "ingest", "split", "regions", "sft", "evaluate", "register", "train_detector")


def build(params: Params):
    """The pipeline, with params' sections as parameter defaults and params.cluster applied."""
    cluster = params.cluster
    values = params_to_dict(params)
    defaults = {name: values[name] for name in RUNTIME_SECTIONS}
    cluster_values = values["cluster"]

    def finetune(*args):
        p = dict(zip([*defaults, "data_version", "lineage"], args, strict=True))

        def sections(step: str) -> dict:
            return {name: p[name] for name in STEPS[step].sections}

        tasks = {
            "scan_labels": scan_labels(**sections("scan_labels"), data_version=p["data_version"]),
            "ingest": ingest(**sections("ingest"), data_version=p["data_version"]),
        }
        tasks["split"] = split(**sections("split"), ingested=tasks["ingest"].outputs["ingested"])
        tasks["regions"] = regions(**sections("regions"), splits=tasks["split"].outputs["splits"])
        tasks["train_detector"] = train_detector(**sections("train_detector"), splits=tasks["split"].outputs["splits"])
        tasks["sft"] = sft(**sections("sft"), candidates=tasks["regions"].outputs["candidates"])
        run = {
            "cluster": cluster_values,
            "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "data_version": p["data_version"],
            "lineage": p["lineage"],
            "conversations": tasks["sft"].outputs["conversations"],
        }
        adapters = {}
        for n in (1, 2, 3):
            task = train_phase(
                phase=n,
                **sections(f"train_phase{n}"),
                trainjob=p["trainjob"],
                **run,
                **{f"phase{k}": adapters[k] for k in adapters},
            )
            tasks[f"train_phase{n}"] = task
            adapters[n] = task.outputs["adapter"]
        phases = {f"phase{n}": adapter for n, adapter in adapters.items()}
        tasks["evaluate"] = evaluate(**sections("evaluate"), **run, **phases)
        tasks["register"] = register(
            **sections("register"), **run, **phases, reports=tasks["evaluate"].outputs["reports"]
        )

        for step, task in tasks.items():
            task.set_display_name(step)
            kind = "train" if step in (*TRAIN_STEPS, "evaluate") else "data"
            task.set_container_image(image(kind, cluster.image_registry))
            for secret, keys in cluster.secrets.items():
                kubernetes.use_secret_as_env(task, secret, {key: key for key in keys})
            if cluster.workspace_pvc:
                kubernetes.mount_pvc(task, cluster.workspace_pvc, cluster.workspace)
        for step in IO_STEPS:
            tasks[step].set_retry(cluster.retries, backoff_duration="30s")
        # They read and write MLflow, which a cached result would skip.
        for step in ("evaluate", "register", "train_detector"):
            tasks[step].set_caching_options(False)
        # with the trainjob launcher the training steps only create and watch TrainJobs
        for step in ("evaluate", *(TRAIN_STEPS if params.train.launcher == "local" else ())):
            _gpu_task(tasks[step], cluster)
        return tasks["register"].outputs["registration"]

    docs = {key: doc for key, doc, _ in field_docs(Params) if "." not in key}
    finetune.__doc__ = (
        "Fine-tune a VLM on inspection images (the stages of dvc.yaml).\n\nArgs:\n"
        + "".join(f"    {name}: params.yaml section `{name}`: {docs.get(name, '')}\n" for name in defaults)
        + "    data_version: Revision of the raw data on the workspace (DVC/git); caches the data steps by it.\n"
        + "    lineage: The dvc.lock and raw .dvc files of that revision (path -> text), logged with the runs.\n"
    )
    finetune.__signature__ = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v, annotation=dict)
            for name, v in defaults.items()
        ]
        + [
            inspect.Parameter("data_version", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="", annotation=str),
            inspect.Parameter("lineage", inspect.Parameter.POSITIONAL_OR_KEYWORD, default={}, annotation=dict),
        ],
        return_annotation=dsl.Artifact,
    )
    return dsl.pipeline(name=NAME)(finetune)


def _gpu_task(task, cluster: ClusterParams) -> None:
    task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(cluster.gpus)
    task.set_cpu_request(cluster.train_cpu).set_memory_request(cluster.train_memory)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
    )
    for label, value in cluster.node_selector.items():
        kubernetes.add_node_selector(task, label, value)
    for toleration in cluster.tolerations:
        kubernetes.add_toleration_json(task, dict(toleration))
