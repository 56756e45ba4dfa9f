"""The vocabulary of a step declaration (`defectvlm.steps` holds the table): a `Step` with its
inputs, outputs, options and cluster resources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class File:
    """A file (or folder) inside an output, as DVC tracks it."""

    name: str
    kind: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True


@dataclass(frozen=True)
class Output:
    """What a step writes: a folder (or, with a suffix, one file); in KFP one artifact."""

    name: str  # the KFP artifact; inputs of later steps refer to it
    path: str  # where the DVC stage writes it; the CLI option's default
    help: str | None = None
    files: tuple[File, ...] = ()  # what DVC tracks in it (none: the path itself)
    option: str | None = "--out"  # None: the step derives the path from params (`${...}`)
    artifact: Literal["Dataset", "Model", "Artifact"] = "Dataset"
    cache: bool = True  # DVC caches the path (when it lists no files)
    metadata: str = ""  # a JSON file in it whose scalars become the KFP artifact's metadata; "file:key"
    leave: tuple[str, ...] = ()  # sub-folders that stay on the cluster workspace, not in the KFP artifact
    result: bool = False  # the KFP pipeline's output (default: the last step's first output)
    cli: Literal["default", "required"] = "default"  # the CLI option: the path as default, or none (required)


@dataclass(frozen=True)
class Input:
    """An output of an earlier step that this step reads."""

    name: str  # the KFP input
    step: str
    output: str
    files: tuple[str, ...] = ()  # the files of it the step reads (none: all of it)
    option: str | None = "--in"  # None: the step finds it through params (`${train.output_dir}/...`)
    help: str | None = None
    file: str = ""  # the step is given this file of the output (`path/file`), not the folder
    # the CLI option: "default" (the declared path), "required" (no default; the user names one)
    # or "optional" (no default: None); the DVC stage and the KFP task always pass the declared path
    cli: Literal["default", "required", "optional"] = "default"
    uri: bool = False  # the KFP task is given the artifact's URI (object store), not its local path


@dataclass(frozen=True)
class Option:
    """A CLI option passed to the function; the DVC stage and the KFP task use `Step.fixed` or the default."""

    flag: str
    help: str | None = None
    default: Any = None
    choices: tuple | None = None
    type: Callable | None = None
    switch: bool = False  # store_true
    required: bool = False
    sets: str = ""  # a params key the option overrides (like -S), instead of a function argument
    group: str = ""  # options of one group are mutually exclusive on the command line

    def __post_init__(self):
        if self.switch:
            object.__setattr__(self, "default", False)


@dataclass(frozen=True)
class Cluster:
    """How the step runs in the KFP pipeline."""

    image: Literal["data", "train"] = "data"
    gpu: bool = False  # cluster.gpus GPUs, CPU and memory requests, /dev/shm, node selector, tolerations
    retry: bool = True  # cluster.retries on failure (a failed GPU run is not retried blindly)
    cache: bool = True  # False: never served from KFP's cache (the step writes to MLflow)
    data_version: bool = False  # reads the raw trees: cached by the run's data version
    run_folder: bool = False  # works in the run's folder on the workspace (train.output_dir), logs lineage
    launcher: bool = False  # training: torchrun in this pod or a TrainJob (train.launcher); GPU when local
    resume_marker: str = ""  # a retried task resumes when this path exists under its option-less output


Argument = Input | Output | Option


@dataclass(frozen=True)
class Step:
    name: str  # the DVC stage and the KFP task's display name
    command: str  # `defectvlm <command>`
    function: Callable[..., int]  # (params, **arguments) -> exit code
    help: str
    arguments: tuple[Argument, ...]  # in CLI order
    params: tuple[str, ...]  # the exact params keys it reads (a section or sub-section: all its keys)
    code: tuple[str, ...]  # the source files (or folders) it runs: its DVC code deps
    deps: tuple[str, ...] = ()  # other DVC deps: raw data roots, config folders
    fixed: dict[str, Any] = field(default_factory=dict)  # option values of the DVC stage and KFP task
    cluster: Cluster = Cluster()
    forms: tuple[Literal["cli", "dvc", "kfp"], ...] = ("cli", "dvc", "kfp")  # what is derived from it

    @property
    def inputs(self) -> tuple[Input, ...]:
        return tuple(a for a in self.arguments if isinstance(a, Input))

    @property
    def outputs(self) -> tuple[Output, ...]:
        return tuple(a for a in self.arguments if isinstance(a, Output))

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(a for a in self.arguments if isinstance(a, Option))

    def argv(self, values: dict[str, Any]) -> list[str]:
        """`defectvlm <command> ...` for these argument values (by dest): paths, fixed options and
        options away from their default."""
        argv = [self.command]
        for argument in self.arguments:
            if isinstance(argument, Option):
                value = values.get(dest(argument), argument.default)
                if argument.switch and value:
                    argv.append(argument.flag)
                elif not argument.switch and (dest(argument) in self.fixed or value != argument.default):
                    argv += [argument.flag, str(value)]
            elif argument.option and dest(argument) in values:
                argv += [argument.option, str(values[dest(argument)])]
        return argv

    @property
    def sections(self) -> tuple[str, ...]:
        """params.yaml sections its KFP task receives: those of its keys, and what MLflow logs."""
        logged = ("model", "train", "tracking") if self.cluster.run_folder else ()
        return tuple(dict.fromkeys([*(key.split(".")[0] for key in self.params), *logged]))


def dest(argument: Argument) -> str:
    """The function's argument name (argparse's dest)."""
    flag = argument.flag if isinstance(argument, Option) else argument.option
    return "input" if flag == "--in" else flag.lstrip("-").replace("-", "_")


def source(argument: Input, steps: dict[str, Step]) -> Output:
    """The output an input reads."""
    (output,) = (o for o in steps[argument.step].outputs if o.name == argument.output)
    return output


def input_path(argument: Input, steps: dict[str, Step]) -> str:
    """The declared path an input passes: its source's path, or the one file of it it names."""
    path = source(argument, steps).path
    return f"{path}/{argument.file}" if argument.file else path


def derived(steps: dict[str, Step], form: str) -> dict[str, Step]:
    """The steps that have a CLI subcommand ("cli"), a DVC stage ("dvc") or a KFP task ("kfp")."""
    return {name: step for name, step in steps.items() if form in step.forms}
