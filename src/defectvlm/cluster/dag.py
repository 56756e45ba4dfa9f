"""The fine-tuning pipeline, built from the step table: one task per step, wired by the outputs
each step reads, with images, GPUs, shared memory, secrets, retries and caching from the
declarations and the params' `cluster` section.

Pipeline parameters: one dict per params.yaml section (data, labels, ..., trainjob) whose default
is that section of the params file the pipeline is built from, plus `data_version` and `lineage`
(the dvc.lock / .dvc files of that version, which the steps that log to MLflow record). Each task
gets exactly the sections its step reads, so a changed section re-runs only the steps that read it
and the steps after them. The `cluster` section is not a parameter: it shapes the compiled pipeline.
"""

from __future__ import annotations

import inspect

from kfp import dsl, kubernetes

from defectvlm.cluster.components import component
from defectvlm.cluster.images import image
from defectvlm.config import ClusterParams, Params, field_docs, params_to_dict
from defectvlm.step_types import Step, derived
from defectvlm.steps import STEPS

NAME = "defectvlm-finetune"
# Sections that are pipeline parameters (everything but `cluster`, which shapes the compiled pipeline).
RUNTIME_SECTIONS = tuple(name for name in Params.model_fields if name != "cluster")


def build(params: Params, steps: dict[str, Step] = STEPS):
    """The pipeline, with params' sections as parameter defaults and params.cluster applied.
    It returns the output declared `result` (none: the last step's first output)."""
    values = params_to_dict(params)
    defaults = {name: values[name] for name in RUNTIME_SECTIONS}
    steps = derived(steps, "kfp")
    factories = {name: component(step, steps) for name, step in steps.items()}
    last = list(steps.values())[-1]
    result = next(((s, o) for s in steps.values() for o in s.outputs if o.result), (last, last.outputs[0]))

    def finetune(*args):
        p = dict(zip([*defaults, "data_version", "lineage"], args, strict=True))
        tasks = {}
        for name, step in steps.items():
            # `cluster` is no pipeline parameter: a step that reads it gets the compiled-in section
            arguments = {section: p.get(section, values[section]) for section in step.sections}
            if step.cluster.data_version or step.cluster.run_folder:
                arguments["data_version"] = p["data_version"]
            if step.cluster.run_folder:
                arguments.update(
                    lineage=p["lineage"], cluster=values["cluster"], job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
                )
            if step.cluster.launcher:
                arguments["trainjob"] = p["trainjob"]
            for needed in step.inputs:
                arguments[needed.name] = tasks[needed.step].outputs[needed.output]
            tasks[name] = factories[name](**arguments)
            _configure(tasks[name], step, params)
        return tasks[result[0].name].outputs[result[1].name]

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
        return_annotation=getattr(dsl, result[1].artifact),
    )
    return dsl.pipeline(name=NAME)(finetune)


def _configure(task, step: Step, params: Params) -> None:
    cluster = params.cluster
    task.set_display_name(step.name)
    task.set_container_image(image(step.cluster.image, cluster.image_registry))
    for secret, keys in cluster.secrets.items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys})
    if cluster.workspace_pvc:
        kubernetes.mount_pvc(task, cluster.workspace_pvc, cluster.workspace)
    if step.cluster.retry:
        task.set_retry(cluster.retries, backoff_duration="30s")
    if not step.cluster.cache:
        task.set_caching_options(False)
    # with the trainjob launcher a training step only creates and watches TrainJobs
    if step.cluster.gpu and not (step.cluster.launcher and params.train.launcher != "local"):
        _gpu_task(task, cluster)


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
