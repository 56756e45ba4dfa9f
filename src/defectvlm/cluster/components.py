"""One KFP lightweight component per declared step, generated from its declaration: a typed
parameter per params section it reads (dict), its inputs and outputs as artifacts, and a body
that calls `defectvlm.cluster.task.run_task`, which runs the step's function in-process. The
project's images (or, under kfp.local, this environment) provide the package; nothing is
pip-installed at run time."""

from __future__ import annotations

import linecache

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from defectvlm.cluster.images import image
from defectvlm.step_types import Step, derived, source
from defectvlm.steps import STEPS

_TYPES = {
    "Artifact": Artifact,
    "Dataset": Dataset,
    "Input": Input,
    "Metrics": Metrics,
    "Model": Model,
    "Output": Output,
}


def signature(step: Step, steps: dict[str, Step] = STEPS) -> list[tuple[str, str]]:
    """(parameter, annotation) of the step's component."""
    parameters = [(section, "dict") for section in step.sections]
    if step.cluster.data_version or step.cluster.run_folder:
        parameters.append(("data_version", "str"))
    if step.cluster.run_folder:
        parameters += [("lineage", "dict"), ("cluster", "dict"), ("job_id", "str")]
    if step.cluster.launcher:
        parameters.append(("trainjob", "dict"))
    parameters += [(i.name, f"Input[{source(i, steps).artifact}]") for i in step.inputs]
    parameters += [(o.name, f"Output[{o.artifact}]") for o in step.outputs]
    if any(f.kind == "metrics" for o in step.outputs for f in o.files):
        parameters.append(("metrics", "Output[Metrics]"))
    return parameters


def component(step: Step, steps: dict[str, Step] = STEPS):
    """The step's KFP component. KFP ships a lightweight component as its function's source, so
    the function is written out (and kept in linecache, where `inspect.getsource` finds it)."""
    name = step.name
    arguments = ", ".join(f"{parameter}: {annotation}" for parameter, annotation in signature(step, steps))
    source_text = (
        f"def {name}({arguments}):\n"
        f"    {step.help!r}\n"
        "    from defectvlm.cluster.task import run_task\n\n"
        f"    run_task({step.name!r}, locals())\n"
    )
    filename = f"<defectvlm step {step.name}>"
    linecache.cache[filename] = (len(source_text), None, source_text.splitlines(keepends=True), filename)
    namespace = dict(_TYPES)
    exec(compile(source_text, filename, "exec", dont_inherit=True), namespace)
    return dsl.component(namespace[name], base_image=image(step.cluster.image), install_kfp_package=False)


def components(steps: dict[str, Step] = STEPS) -> dict:
    """Every step's component (of the steps in the KFP pipeline), by step name."""
    return {name: component(step, steps) for name, step in derived(steps, "kfp").items()}
