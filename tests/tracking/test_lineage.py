"""Lineage: the SFT split digests pin the images' content; git facts (uncommitted changes in the
pipeline key); dvc.lock digests; a data version on every run, cluster runs included."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from PIL import Image

from defectvlm.cluster.task import run_task
from defectvlm.config import Params, TrainParams, params_from_dict
from defectvlm.io import read_jsonl
from defectvlm.steps import STEPS
from defectvlm.tracking.lineage import (
    DATA_VERSION_ENV,
    dvc_digests,
    file_md5,
    git_info,
    lineage_files,
    lineage_tags,
    pipeline_key,
    split_digests,
)
from defectvlm.tracking.mlflow_tracking import parent_run_id
from tests.conftest import prepare_sft, run_cli, write_params


def prepare(params: Path, out: Path) -> dict[str, str]:
    return split_digests(prepare_sft(params, out))


def test_changing_one_image_changes_only_its_splits_digest(tmp_path):
    raw = tmp_path / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 10, "--n-normal", 10, "--seed", 3) == 0
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    before = prepare(params, tmp_path / "before")
    assert set(before) == {"train", "val", "test"}
    assert prepare(params, tmp_path / "again") == before  # same data, same digests

    record = read_jsonl(tmp_path / "before" / "04" / "test.jsonl")[0]
    image_path = Path(record["images"][0])
    with Image.open(image_path) as image:
        changed = image.copy()
    changed.putpixel((0, 0), (255, 0, 0))
    changed.save(image_path, quality=95)  # same size, same labels: only the pixels differ
    after = prepare(params, tmp_path / "after")
    assert after["test"] != before["test"]
    assert after["train"] == before["train"] and after["val"] == before["val"]


def test_git_info_reads_the_repository_or_the_image_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTVLM_GIT_COMMIT", raising=False)
    assert git_info(tmp_path) == {}
    monkeypatch.setenv("DEFECTVLM_GIT_COMMIT", "abc123")
    assert git_info(tmp_path) == {"git.commit": "abc123", "git.source": "image"}

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "c")
    git("tag", "v1")
    info = git_info(tmp_path)
    assert info == {"git.commit": git("rev-parse", "HEAD"), "git.dirty": "false", "git.tag": "v1"}
    (tmp_path / "f.txt").write_text("b")
    assert git_info(tmp_path)["git.dirty"] == "true"
    (tmp_path / "untracked.txt").write_text("c")
    (tmp_path / "f.txt").write_text("a")
    assert git_info(tmp_path)["git.dirty"] == "false"  # untracked files (data, dvc.lock) do not count


def test_dvc_digests_lists_every_dependency_and_output_of_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    deps:\n    - path: data/raw/a\n      md5: d1.dir\n"
        "    outs:\n    - path: data/01/manifest.jsonl\n      md5: m1\n  sft:\n    cmd: y\n    outs:\n"
        "    - path: data/04/test.jsonl\n      md5: t1\n",
        encoding="utf-8",
    )
    assert dvc_digests(lock) == {"data/01/manifest.jsonl": "m1", "data/04/test.jsonl": "t1", "data/raw/a": "d1.dir"}
    assert dvc_digests(tmp_path / "missing.lock") == {}
    assert len(file_md5(lock)) == 32


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A committed git checkout with SFT split files, as the current directory."""
    monkeypatch.delenv(DATA_VERSION_ENV, raising=False)
    (tmp_path / "sft").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "sft" / f"{split}.jsonl").write_text(f'{{"split": "{split}"}}\n', encoding="utf-8")
    (tmp_path / "code.py").write_text("x = 1\n", encoding="utf-8")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_uncommitted_changes_are_part_of_the_pipeline_key(checkout):
    params = Params()
    clean = pipeline_key(params, Path("sft"))
    (checkout / "code.py").write_text("x = 2\n", encoding="utf-8")
    dirty = pipeline_key(params, Path("sft"))
    (checkout / "code.py").write_text("x = 3\n", encoding="utf-8")
    other = pipeline_key(params, Path("sft"))
    assert len({clean, dirty, other}) == 3
    (checkout / "code.py").write_text("x = 1\n", encoding="utf-8")
    assert pipeline_key(params, Path("sft")) == clean


def test_a_dirty_run_gets_its_own_parent_run_tagged_dirty(checkout):
    params = params_from_dict({"tracking": {"uri": f"sqlite:///{checkout / 'mlflow.db'}"}})
    clean = parent_run_id(params, Path("sft"))
    (checkout / "code.py").write_text("x = 2\n", encoding="utf-8")
    dirty = parent_run_id(params, Path("sft"))
    assert dirty != clean
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    assert client.get_run(clean).data.tags["git.dirty"] == "false"
    tags = client.get_run(dirty).data.tags
    assert tags["git.dirty"] == "true" and len(tags["git.diff_sha256"]) == 64


def test_every_run_has_a_data_version(checkout, monkeypatch):
    params = Params()
    tags = lineage_tags(params, Path("sft"))  # no DVC files, no environment: from the SFT digests
    assert tags["data.version"].startswith("sft:")
    for name, md5 in (("abnormal_root", "a" * 32), ("normal_root", "b" * 32)):  # as `dvc add` writes them
        dvc_file = checkout / "data" / "raw" / f"{name}.dvc"
        dvc_file.parent.mkdir(parents=True, exist_ok=True)
        dvc_file.write_text(f"outs:\n- md5: {md5}.dir\n  path: {name}\n", encoding="utf-8")
    dvc_run = lineage_tags(params, Path("sft"))["data.version"]
    assert dvc_run == f"dvc:abnormal_root={'a' * 32}.dir,normal_root={'b' * 32}.dir"
    monkeypatch.setenv(DATA_VERSION_ENV, "v7")
    assert lineage_tags(params, Path("sft"))["data.version"] == "v7"


def test_a_cluster_step_gets_the_data_version_and_logs_the_dvc_lock_it_ran_with(checkout, monkeypatch):
    seen = {}

    def fake_evaluate(params, **arguments):
        seen.update(tags=lineage_tags(params, Path("sft")), files=lineage_files(params))
        return 0

    monkeypatch.setitem(STEPS, "evaluate", dataclasses.replace(STEPS["evaluate"], function=fake_evaluate))
    lineage = {"dvc.lock": "schema: '2.0'\nstages: {}\n", "data/raw/abnormal_root.dvc": "outs: []\n"}
    phases = {f"phase{n}": SimpleNamespace(path=str(checkout / f"phase{n}")) for n in (1, 2, 3)}
    for phase in phases.values():
        Path(phase.path).mkdir()
    reports = SimpleNamespace(path=str(checkout / "reports"), metadata={})
    Path(reports.path).mkdir()
    (Path(reports.path) / "metrics.json").write_text("{}", encoding="utf-8")
    values = {"model": {}, "train": {}, "tracking": {}, "cluster": {"workspace": str(checkout / "workspace")}}
    values.update(job_id="job1", data_version="data@v7", lineage=lineage, metrics=None, reports=reports)
    run_task("evaluate", {**values, **phases, "conversations": SimpleNamespace(path="sft")})
    assert os.environ[DATA_VERSION_ENV] == "data@v7"
    monkeypatch.delenv(DATA_VERSION_ENV)  # a TrainJob pod: no step environment, the run folder's record
    assert seen["tags"]["data.version"] == "data@v7" and seen["files"] == lineage
    run_folder = Params(train=TrainParams(output_dir=str(checkout / "workspace" / "runs" / "job1")))
    assert lineage_tags(run_folder, Path("sft"))["data.version"] == "data@v7"
    assert lineage_files(run_folder) == lineage


def test_steps_that_start_together_share_one_parent_run(checkout, monkeypatch):
    """Two steps of one pipeline execution that both look before either creates (parallel DAG
    branches, concurrent registrations) end with one parent run, the same for both."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    params = params_from_dict({"tracking": {"uri": f"sqlite:///{checkout / 'mlflow.db'}"}})
    parent_run_id(params, Path("sft.other"))  # the store's tables exist before the race
    search, barrier, first = mlflow.MlflowClient.search_runs, threading.Barrier(2), threading.local()

    def search_together(self, *args, **kwargs):
        found = search(self, *args, **kwargs)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait(timeout=60)  # both have found no parent run
        return found

    with monkeypatch.context() as patched, ThreadPoolExecutor(2) as pool:
        patched.setattr(mlflow.MlflowClient, "search_runs", search_together)
        ids = list(pool.map(lambda _: parent_run_id(params, Path("sft")), range(2)))
    assert ids[0] == ids[1]
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    key = pipeline_key(params, Path("sft"))
    experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`defectvlm.pipeline_key` = '{key}'")
    assert [r.info.run_id for r in runs] == [ids[0]]
    assert client.get_run(ids[0]).data.params  # the survivor carries the parameters


def test_a_dataset_input_lost_to_a_concurrent_insert_is_linked_on_the_next_attempt(checkout, monkeypatch):
    """A PostgreSQL-backed server answers the loser of two inserts of one new dataset with a
    unique-constraint error; the step logs its input again instead of failing."""
    from mlflow.exceptions import MlflowException

    from defectvlm.tracking.mlflow_tracking import step_run

    params = params_from_dict({"tracking": {"uri": f"sqlite:///{checkout / 'mlflow.db'}"}})
    log_input, calls = mlflow.log_input, []

    def lose_the_first_race(dataset, context=None, **kwargs):
        calls.append(dataset.name)
        if len(calls) == 1:
            raise MlflowException(
                "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint"
                ' "dataset_pk"'
            )
        return log_input(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lose_the_first_race)
    with step_run(params, Path("sft"), "evaluate", ("val", "test")) as run:
        run_id = run.info.run_id
    assert calls == ["sft.val", "sft.val", "sft.test"]
    inputs = mlflow.MlflowClient(tracking_uri=params.tracking.uri).get_run(run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["sft.test", "sft.val"]

    def refuse(*args, **kwargs):
        raise MlflowException("RESOURCE_EXHAUSTED: quota")

    monkeypatch.setattr(mlflow, "log_input", refuse)
    with pytest.raises(MlflowException, match="RESOURCE_EXHAUSTED"):  # other errors are not retried
        with step_run(params, Path("sft"), "evaluate", ("val",)):
            pass
