"""The CLI, dvc.yaml and the KFP pipeline agree: same steps, same commands, same parameters, same DAG."""

from __future__ import annotations

import re
import shlex

import yaml

from defectvlm.cli import build_parser
from defectvlm.cluster.dag import RUNTIME_SECTIONS
from defectvlm.cluster.task import params_from_sections
from defectvlm.config import load_params, params_from_dict, params_to_dict
from defectvlm.step_types import Option, derived, dest, input_path
from defectvlm.steps import STEPS
from tests.cluster.conftest import tasks_by_step
from tests.conftest import REPO, repo_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
PARAMS = params_to_dict(load_params(REPO / "params.yaml"))


def _interpolate(text: str) -> str:
    def lookup(match: re.Match) -> str:
        value = PARAMS
        for part in match[1].split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def _paths(entries: list) -> list[str]:
    return [_interpolate(next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def _dvc_upstream() -> dict[str, set[str]]:
    outs = {
        name: _paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))
        for name, stage in DVC.items()
    }
    upstream = {}
    for name, stage in DVC.items():
        deps = _paths(stage.get("deps", []))
        upstream[name] = {
            other
            for other, paths in outs.items()
            for dep in deps
            for out in paths
            if dep == out or out.startswith(dep + "/") or dep.startswith(out + "/")
        }
    return upstream


def _closure(direct: dict[str, set[str]]) -> dict[str, set[str]]:
    def ancestors(name: str) -> set[str]:
        found = set(direct[name])
        for parent in direct[name]:
            found |= ancestors(parent)
        return found

    return {name: ancestors(name) for name in direct}


def test_the_pipeline_has_the_stages_of_dvc_yaml(compiled):
    spec, _ = compiled
    assert set(derived(STEPS, "dvc")) == set(DVC)
    assert set(tasks_by_step(spec)) == set(derived(STEPS, "kfp")) >= set(DVC)


def test_each_dvc_stage_runs_its_steps_function_with_the_declared_paths_and_options():
    parser = build_parser()
    for name, step in derived(STEPS, "dvc").items():
        dvc_argv = shlex.split(DVC[name]["cmd"])
        assert dvc_argv[0] == "defectvlm", name
        args = parser.parse_args(dvc_argv[1:])
        assert args.func.args[0] is step.function, name  # the CLI's handler calls the declared function
        for argument in step.arguments:
            if isinstance(argument, Option):
                assert getattr(args, dest(argument)) == step.fixed.get(dest(argument), argument.default), name
            elif argument.option:
                declared = argument.path if argument in step.outputs else input_path(argument, STEPS)
                assert getattr(args, dest(argument)) == declared, (name, argument.name)


def test_each_step_reads_every_section_its_dvc_stage_lists():
    for name, step in derived(STEPS, "dvc").items():
        listed = {key.split(".")[0] for key in DVC[name].get("params", [])}
        assert listed <= set(step.sections), (name, listed - set(step.sections))


def test_pipeline_parameters_are_the_params_sections_with_params_yaml_defaults(compiled):
    spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {*RUNTIME_SECTIONS, "data_version", "lineage"}
    compiled_from = params_to_dict(params_from_dict(repo_params()))  # compile_to's params.yaml
    for name in RUNTIME_SECTIONS:
        default = params_to_dict(params_from_sections({name: inputs[name]["defaultValue"]}))[name]
        assert default == compiled_from[name], name


def test_each_task_gets_exactly_its_steps_sections(compiled):
    spec, _ = compiled
    extra = {"scan_labels": {"data_version"}, "ingest": {"data_version"}}
    lineage = {"data_version", "lineage"}  # the steps that log to MLflow log the run's data version
    extra.update({f"train_phase{n}": {"trainjob", *lineage} for n in (1, 2, 3)})
    extra.update({"evaluate": lineage, "register": lineage})
    for name, task in tasks_by_step(spec).items():
        from_pipeline = {
            key for key, value in task["inputs"]["parameters"].items() if "componentInputParameter" in value
        }
        # `cluster` is compiled in, not a pipeline parameter
        assert from_pipeline == set(STEPS[name].sections) - {"cluster"} | extra.get(name, set()), name


def test_the_task_graph_orders_steps_as_dvc_does(compiled):
    spec, _ = compiled
    by_key = {key: task["taskInfo"]["name"] for key, task in spec["root"]["dag"]["tasks"].items()}
    kfp_upstream = {
        by_key[key]: {by_key[dep] for dep in task.get("dependentTasks", [])}
        for key, task in spec["root"]["dag"]["tasks"].items()
    }
    in_dvc = {name: upstream for name, upstream in _closure(kfp_upstream).items() if name in DVC}
    assert in_dvc == _closure(_dvc_upstream())
    # the cluster-only deploy renders the registered version once its export is tagged
    assert _closure(kfp_upstream)["deploy"] == {"export", "register"} | _closure(kfp_upstream)["register"]
