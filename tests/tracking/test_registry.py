"""register and promote against a real MLflow store (sqlite, and the PostgreSQL-backed `mlflow server`
for concurrent moves), with a real adapter and evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from defectvlm.config import load_params
from defectvlm.tracking import registry
from defectvlm.tracking.lineage import file_md5
from tests.conftest import read_json, run_cli
from tests.tracking.test_team_storage import mlflow_server, postgres_db, s3_env  # noqa: F401 - fixtures

NAME = "defectvlm-adapter"


def client(work: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=load_params(work / "params.yaml").tracking.uri)


def register(work: Path, roi_f1: float | None = None, auroc: float | None = None, sft: str = "sft", *extra) -> str:
    """Register the run with its evaluation, optionally with other test figures (as another run would score)."""
    reports = work / "reports"
    if roi_f1 is not None:
        reports = work / f"reports_{roi_f1}_{auroc}_{sft}"
        shutil.copytree(work / "reports", reports, dirs_exist_ok=True)
        metrics = read_json(reports / "metrics.json")
        metrics["test"]["roi"]["f1"], metrics["test"]["image"]["auroc"] = roi_f1, auroc
        (reports / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    out = reports / "registration.json"
    assert run_cli("register", "--in", work / sft, "--reports", reports, "--out", out, *extra) == 0
    return read_json(out)["version"]


def promote(*args: str) -> int:
    return run_cli("promote", "-S", "registry.gates={roi.f1: 0.2, image.auroc: 0.5}", *args)


def test_register_ships_the_adapter_only_and_leads_back_to_commit_and_data(workspace):
    version = register(workspace)
    mv = client(workspace).get_model_version_by_alias(NAME, "candidate")
    assert mv.version == version
    metrics = read_json(workspace / "reports" / "metrics.json")
    inference = read_json(workspace / "reports" / "inference.json")
    assert float(mv.tags["metric.test.roi.f1"]) == metrics["test"]["roi"]["f1"]
    assert float(mv.tags["threshold"]) == inference["threshold"]
    assert mv.tags["base_model"] == "tiny"
    for split in ("train", "val", "test"):
        assert mv.tags[f"data.sft.{split}.md5"] == file_md5(workspace / "sft" / f"{split}.jsonl")

    # lineage: version -> register run -> pipeline run -> commit; the commit is the repository's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout.strip()
    c = client(workspace)
    register_run = c.get_run(mv.run_id)
    pipeline = c.get_run(register_run.data.tags["mlflow.parentRunId"])
    assert pipeline.info.run_id == mv.tags["pipeline_run_id"]
    assert pipeline.data.tags["git.commit"] == head == mv.tags["git.commit"]
    assert pipeline.data.tags["git.dirty"] == "false"
    inputs = {d.dataset.name: d.dataset.digest for d in register_run.inputs.dataset_inputs}
    assert inputs == {"sft.test": mv.tags["data.sft.test.md5"]}

    # adapter only: the LoRA files, the trained projector, processor and inference config; no base weights
    files = {Path(f.path).name for f in c.list_artifacts(mv.run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "prompt.json", "inference.json"} <= files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files)
    local = Path(
        mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", tracking_uri=c.tracking_uri)
    )
    assert json.loads((local / "inference.json").read_text())["threshold"] == inference["threshold"]


def test_promote_gates_compare_on_the_same_test_set_and_keep_history(workspace):
    c = client(workspace)
    first = register(workspace, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    below_gate = register(workspace, roi_f1=0.1, auroc=0.9)
    assert promote() == 1
    worse = register(workspace, roi_f1=0.45, auroc=0.8)
    assert promote("--version", worse) == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    other_sft = workspace / "sft_other"
    shutil.copytree(workspace / "sft", other_sft)
    lines = (other_sft / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (other_sft / "test.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    elsewhere = register(workspace, roi_f1=0.9, auroc=0.95, sft="sft_other")
    assert promote() == 1
    assert c.get_model_version_by_alias(NAME, "champion").version == first

    better = register(workspace, roi_f1=0.6, auroc=0.7)  # @candidate stays on the later pipeline run's version
    assert c.get_model_version_by_alias(NAME, "candidate").version == elsewhere
    assert promote("--version", better) == 0
    assert c.get_model_version_by_alias(NAME, "champion").version == better
    old = c.get_model_version(NAME, first)
    assert old.current_stage == "None" and json.loads(old.tags["retired.champion"])["version"] == better
    assert json.loads(old.tags["promoted.champion"])["version"] == first

    assert promote("--version", below_gate, "--force") == 1  # a forced promotion needs a reason
    assert promote("--version", below_gate, "--force", "--reason", "line 3 needs slag recall now") == 0
    forced = json.loads(c.get_model_version(NAME, below_gate).tags["promoted.champion"])
    assert forced["forced"] and forced["reason"] == "line 3 needs slag recall now" and forced["overridden"]
    history = json.loads(c.get_registered_model(NAME).tags["history.champion"])
    assert [h["version"] for h in history] == [first, better, below_gate]
    assert [h["previous"] for h in history] == [None, first, better]
    assert elsewhere not in {h["version"] for h in history}


def test_promote_refusal_names_each_reason(workspace, capsys):
    register(workspace, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    register(workspace, roi_f1=0.1, auroc=0.6)
    assert promote() == 1
    err = capsys.readouterr().err
    assert "roi.f1 = 0.1000 is below the gate 0.2" in err
    assert "test roi.f1 = 0.1000 is below @champion v1's 0.5000" in err
    assert "test image.auroc = 0.6000 is below @champion v1's 0.7000" in err
    assert "Traceback" not in err


def test_promote_can_require_a_passed_export_parity_check(workspace, capsys):
    version = register(workspace, roi_f1=0.5, auroc=0.7)
    required = ("-S", "registry.require_export_parity=true")
    assert promote(*required) == 1
    assert "no export parity check recorded" in capsys.readouterr().err
    record = {"max_abs_diff": 0.01, "tolerance": 1e-4, "passed": False}
    client(workspace).set_model_version_tag(NAME, version, registry.PARITY_TAG, json.dumps(record))
    assert promote(*required) == 1
    assert "failed the parity check (max |dP| 0.01 > 0.0001" in capsys.readouterr().err
    record.update(max_abs_diff=2e-6, passed=True)
    client(workspace).set_model_version_tag(NAME, version, registry.PARITY_TAG, json.dumps(record))
    assert promote(*required) == 0
    assert client(workspace).get_model_version_by_alias(NAME, "champion").version == version


def test_promote_rescores_the_champion_on_the_candidates_newer_test_set(workspace, capsys):
    c = client(workspace)
    champion = register(workspace, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    newer = workspace / "sft_newer"  # a data refresh: the test set changed
    shutil.copytree(workspace / "sft", newer)
    lines = (newer / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (newer / "test.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")

    weak = register(workspace, roi_f1=-1.0, auroc=-1.0, sft="sft_newer")
    assert promote("-S", "registry.gates={}", "--in", newer) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"below @champion v{champion} (re-scored on test set {file_md5(newer / 'test.jsonl')[:8]})" in err
    assert c.get_model_version_by_alias(NAME, "champion").version == champion

    # the re-scoring is the evaluate step's scoring pass on the new test set, logged
    assert (
        run_cli("evaluate", "--in", newer, "--out", workspace / "reports_newer", "--no-baseline", "--no-tracking") == 0
    )
    expected = read_json(workspace / "reports_newer" / "metrics.json")["test"]
    experiment = c.get_experiment_by_name(load_params(workspace / "params.yaml").tracking.experiment)
    (run,) = c.search_runs([experiment.experiment_id], "tags.`defectvlm.step` = 'reevaluate'")
    assert run.data.metrics["test.roi.f1"] == expected["roi"]["f1"]
    assert run.data.metrics["test.image.auroc"] == expected["image"]["auroc"]
    assert run.data.tags["defectvlm.reevaluated_version"] == str(champion)
    assert run.data.tags["mlflow.parentRunId"] == c.get_model_version(NAME, weak).tags["pipeline_run_id"]
    recorded = json.loads(c.get_model_version(NAME, champion).tags[f"reevaluated.{file_md5(newer / 'test.jsonl')}"])
    assert recorded["test.roi.f1"] == expected["roi"]["f1"]

    strong = register(workspace, roi_f1=1.0, auroc=1.0, sft="sft_newer")
    assert promote("--in", newer) == 0  # no --force needed: compared on equal terms
    assert c.get_model_version_by_alias(NAME, "champion").version == strong


@pytest.fixture
def on_server(workspace, mlflow_server):  # noqa: F811 - the fixture imported above
    """The workspace with its tracking store on the PostgreSQL-backed `mlflow server`."""
    params = yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8"))
    params["tracking"]["uri"] = mlflow_server
    (workspace / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return workspace


def _decide_together(monkeypatch, parties: int) -> None:
    """Each promoting thread's first decision waits for the others': all of them compare against
    the same holder before any moves the alias (two operators pressing enter at once)."""
    decide, barrier, waited = registry._comparison_failures, threading.Barrier(parties), threading.local()

    def together(*args):
        result = decide(*args)
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait(timeout=300)
        return result

    monkeypatch.setattr(registry, "_comparison_failures", together)


@pytest.mark.slow
def test_two_promotions_at_once_exactly_one_wins_and_the_loser_keeps_no_tag(on_server, capsys, monkeypatch):
    c = client(on_server)
    first = register(on_server, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    a, b = register(on_server, roi_f1=0.6, auroc=0.8), register(on_server, roi_f1=0.7, auroc=0.9)
    _decide_together(monkeypatch, 2)
    with ThreadPoolExecutor(2) as pool:
        codes = dict(zip((a, b), pool.map(lambda v: promote("--version", v), (a, b)), strict=True))

    assert sorted(codes.values()) == [0, 1]
    winner, loser = sorted(codes, key=codes.get)
    assert c.get_model_version_by_alias(NAME, "champion").version == winner
    assert "promoted.champion" not in c.get_model_version(NAME, loser).tags
    err = " ".join(capsys.readouterr().err.split())
    assert f"v{loser} not promoted to @champion: another promotion moved @champion to v{winner}" in err
    history = json.loads(c.get_registered_model(NAME).tags["history.champion"])
    assert [(h["version"], h["previous"]) for h in history] == [(first, None), (winner, first)]
    assert [m.name for m in c.search_registered_models()] == [NAME]  # the lock is gone


@pytest.mark.slow
def test_history_keeps_every_move_under_concurrent_promotions(on_server, monkeypatch):
    c = client(on_server)
    first = register(on_server, roi_f1=0.5, auroc=0.7)
    assert promote() == 0
    versions = [register(on_server, roi_f1=0.5, auroc=0.7) for _ in range(4)]
    _decide_together(monkeypatch, len(versions))

    def promote_until_it_moves(version: str) -> int:
        for _ in range(10):  # a loser runs promote again, as its message says
            if promote("--version", version, "--force", "--reason", "concurrency test") == 0:
                return 0
        return 1

    with ThreadPoolExecutor(len(versions)) as pool:
        assert list(pool.map(promote_until_it_moves, versions)) == [0] * len(versions)
    history = json.loads(c.get_registered_model(NAME).tags["history.champion"])
    assert sorted(h["version"] for h in history[1:]) == sorted(versions) and history[0]["version"] == first
    assert [h["previous"] for h in history[1:]] == [h["version"] for h in history[:-1]]  # an unbroken chain
    assert c.get_model_version_by_alias(NAME, "champion").version == history[-1]["version"]


@pytest.mark.slow
def test_candidate_never_moves_back_to_an_older_pipeline_runs_version(on_server):
    c = client(on_server)
    older = register(on_server, roi_f1=0.5, auroc=0.7)  # pipeline run A
    newer = register(on_server, 0.6, 0.8, "sft", "-S", "train.seed=7")  # pipeline run B, started later
    assert c.get_model_version_by_alias(NAME, "candidate").version == newer
    late = register(on_server, roi_f1=0.9, auroc=0.9)  # A's slow registration finishing last
    assert int(late) > int(newer) > int(older)
    assert c.get_model_version_by_alias(NAME, "candidate").version == newer
    registration = read_json(on_server / "reports_0.9_0.9_sft" / "registration.json")
    assert registration["candidate"] == str(newer) and registration["alias"] is None
    again = register(on_server, 0.7, 0.8, "sft", "-S", "train.seed=7")  # B's next registration moves it on
    assert c.get_model_version_by_alias(NAME, "candidate").version == again


def test_the_alias_lock_retries_when_the_servers_lookup_after_a_lost_race_finds_it_released():
    """A server answers a lost create race by looking the lock up; when the holder released it in
    between, that lookup fails with RESOURCE_DOES_NOT_EXIST, which means: try again."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class RacingClient:
        def __init__(self):
            self.creates, self.deleted, self.tags = 0, [], None

        def create_registered_model(self, name, tags=None, description=""):
            self.creates += 1
            if self.creates == 1:
                raise MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST)
            self.tags = tags

        def get_registered_model(self, name):
            if self.tags is None:
                raise MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST)
            return SimpleNamespace(tags=self.tags, creation_timestamp=0)

        def delete_registered_model(self, name):
            self.deleted.append(name)

    racing = RacingClient()
    with registry.alias_lock(racing, NAME, "candidate"):
        assert racing.creates == 2
    assert racing.deleted == [f"{NAME}.lock.candidate"]
