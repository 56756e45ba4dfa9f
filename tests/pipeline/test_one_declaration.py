"""Adding a step costs one declaration: a toy step gets its CLI subcommand, its DVC stage and its
KFP component (wired into the pipeline after the step whose output it reads) from its `Step`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from defectvlm.cli import build_parser
from defectvlm.cluster.dag import build
from defectvlm.cluster.task import run_task
from defectvlm.config import Params, load_params
from defectvlm.dvc_stages import dvc_yaml
from defectvlm.io import read_jsonl, write_json_atomic
from defectvlm.step_types import File, Input, Output, Step
from defectvlm.steps import STEPS
from tests.cluster.conftest import tasks_by_step
from tests.conftest import REPO


def count_abnormal(params: Params, input: str, out: str) -> int:
    manifest = read_jsonl(Path(input) / "manifest.jsonl")
    abnormal = sum(record["label"] == "abnormal" for record in manifest)
    write_json_atomic(Path(out) / "counts.json", {"abnormal": abnormal, "seed": params.split.seed})
    return 0


TOY = Step(
    "count",
    "count-abnormal",
    count_abnormal,
    "Count the abnormal images of the manifest.",
    (
        Input("ingested", "ingest", "ingested", ("manifest.jsonl",), help="folder with manifest.jsonl"),
        Output("counts", "data/counts", "output folder", (File("counts.json", "metrics", cache=False),)),
    ),
    ("split.seed",),
    ("tests/pipeline/test_one_declaration.py",),
)
TABLE = {**STEPS, "count": TOY}


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True)
    records = [{"id": str(n), "label": "abnormal" if n % 3 else "normal"} for n in range(6)]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def test_the_toy_step_is_a_cli_subcommand(tmp_path):
    ingested = _manifest(tmp_path / "ingested")
    argv = ["count-abnormal", "--params", str(REPO / "params.yaml"), "--in", str(ingested), "--out", str(tmp_path)]
    args = build_parser(TABLE).parse_args(argv)
    assert args.func(args) == 0
    assert json.loads((tmp_path / "counts.json").read_text()) == {"abnormal": 4, "seed": 42}
    defaults = build_parser(TABLE).parse_args(["count-abnormal"])
    assert (defaults.input, defaults.out) == ("data/01_ingested", "data/counts")


def test_the_toy_step_is_a_dvc_stage():
    stage = yaml.safe_load(dvc_yaml(TABLE))["stages"]["count"]
    assert stage == {
        "cmd": "defectvlm count-abnormal --in data/01_ingested --out data/counts",
        "deps": ["data/01_ingested/manifest.jsonl", "tests/pipeline/test_one_declaration.py"],
        "params": ["split.seed"],
        "metrics": [{"data/counts/counts.json": {"cache": False}}],
    }


def test_the_toy_step_is_a_kfp_task_after_ingest_that_calls_its_function(tmp_path):
    from kfp import compiler

    compiler.Compiler().compile(build(load_params(REPO / "params.yaml"), TABLE), str(tmp_path / "p.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text(encoding="utf-8")))
    task = tasks_by_step(spec)["count"]
    assert task["dependentTasks"] == ["ingest"]
    assert task["inputs"]["artifacts"]["ingested"]["taskOutputArtifact"] == {
        "outputArtifactKey": "ingested",
        "producerTask": "ingest",
    }
    assert set(task["inputs"]["parameters"]) == {"split"}

    logged = {}
    counts = SimpleNamespace(path=str(tmp_path / "counts"), metadata={})
    metrics = SimpleNamespace(log_metric=logged.__setitem__)
    ingested = SimpleNamespace(path=str(_manifest(tmp_path / "ingested")))
    run_task("count", {"split": {"seed": 7.0}, "ingested": ingested, "counts": counts, "metrics": metrics}, TABLE)
    assert json.loads((tmp_path / "counts" / "counts.json").read_text()) == {"abnormal": 4, "seed": 7}
    assert logged == {"abnormal": 4, "seed": 7}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "--images", "x"], "the following arguments are required: --model"),  # a required input
        (["export", "--model", "@candidate"], "the following arguments are required: --out"),  # a required output
        (
            ["predict", "--model", "m", "--images", "x", "--regions", "b.jsonl", "--proposals", "detector"],
            "argument --proposals: not allowed with argument --regions",  # one group: exclusive
        ),
    ],
)
def test_declared_cli_rules_are_the_parsers(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_an_optional_input_has_no_default_and_a_file_input_names_its_file():
    args = build_parser().parse_args(["predict", "--model", "m", "--images", "x"])
    assert args.detector is None and args.proposals is None  # the stage passes them; a user need not
    stage = yaml.safe_load(dvc_yaml())["stages"]["predict"]
    assert "--images data/02_split/test.jsonl" in stage["cmd"] and "--model reports/registration.json" in stage["cmd"]
