"""dvc.yaml, generated from the step table (`defectvlm pipeline dvc` writes it; a test checks
the committed file against it)."""

from __future__ import annotations

import yaml

from defectvlm.step_types import Input, Step, derived, dest, input_path, source
from defectvlm.steps import STEPS

HEADER = """\
# Generated from the step table defectvlm.steps.STEPS by `defectvlm pipeline dvc`: edit the
# declarations there, not this file. Local, cached pipeline: `dvc repro`. Paths come from
# params.yaml (${...}), so the same names drive the CLI, these stages and the cluster pipeline.
"""


def dvc_yaml(steps: dict[str, Step] = STEPS) -> str:
    body = yaml.safe_dump(
        {"stages": {name: stage(step, steps) for name, step in derived(steps, "dvc").items()}},
        allow_unicode=True,
        sort_keys=False,
        width=120,
    )
    return HEADER + body


def stage(step: Step, steps: dict[str, Step]) -> dict:
    outs = {"outs": [], "metrics": [], "plots": []}
    for output in step.outputs:
        if not output.files:
            outs["outs"].append(_entry(output.path, output.cache))
        for file in output.files:
            outs[file.kind].append(_entry(f"{output.path}/{file.name}", file.cache))
    return {
        "cmd": " ".join(["defectvlm", *step.argv(declared_paths(step, steps))]),
        "deps": [*(path for i in step.inputs for path in input_paths(i, steps)), *step.deps, *step.code],
        "params": list(step.params),
        **{kind: entries for kind, entries in outs.items() if entries},
    }


def declared_paths(step: Step, steps: dict[str, Step]) -> dict[str, str]:
    """The stage's argument values: its fixed options and the declared paths of its inputs and outputs."""
    paths = {dest(i): input_path(i, steps) for i in step.inputs if i.option}
    return {**step.fixed, **paths, **{dest(o): o.path for o in step.outputs if o.option}}


def input_paths(argument: Input, steps: dict[str, Step]) -> list[str]:
    path = source(argument, steps).path
    return [f"{path}/{name}" for name in argument.files] or [path]


def _entry(path: str, cache: bool) -> str | dict:
    return path if cache else {path: {"cache": False}}
