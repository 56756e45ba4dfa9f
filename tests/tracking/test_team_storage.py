"""Team storage against real servers on loopback: DVC push/pull through an S3-compatible server
(moto), and a real `mlflow server` backed by the machine's PostgreSQL with artifacts in S3,
taking four registrations at once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import mlflow
import psycopg2
import pytest
from moto.server import ThreadedMotoServer

pytestmark = pytest.mark.slow
BUCKET = "defectvlm"
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def s3_env(monkeypatch) -> dict:
    """An S3-compatible server on 127.0.0.1 with one bucket; the environment its clients need."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "team-key",
        "AWS_SECRET_ACCESS_KEY": "team-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield {**env, "endpoint": endpoint}
    server.stop()


def test_dvc_push_then_pull_round_trips_the_data_through_s3(tmp_path, s3_env):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    repo = tmp_path / "repo"
    (repo / "images").mkdir(parents=True)
    payload = {f"images/{i}.bin": os.urandom(2048 + i) for i in range(5)}
    for name, data in payload.items():
        (repo / name).write_bytes(data)
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc"], repo, env)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3_env["endpoint"]], repo, env)
    run(["dvc", "add", "-q", "images"], repo, env)
    run(["dvc", "push"], repo, env)
    stored = boto3.client("s3", endpoint_url=s3_env["endpoint"]).list_objects_v2(Bucket=BUCKET, Prefix="dvc/")
    assert stored["KeyCount"] == len(payload) + 1  # the files and the directory listing

    shutil.rmtree(repo / "images")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(["dvc", "pull"], repo, env)
    assert {str(p.relative_to(repo)): p.read_bytes() for p in (repo / "images").iterdir()} == payload


@pytest.fixture
def postgres_db() -> str:
    name = f"defectvlm_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield f"{POSTGRES}/{name}"
    admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def mlflow_server(tmp_path, postgres_db, s3_env) -> str:
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", postgres_db, "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(30)
    log.close()


def test_postgres_backed_server_takes_four_concurrent_registrations(evaluated, tmp_path, mlflow_server, s3_env):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_S3_ENDPOINT_URL")  # clients go through the server's artifact proxy: no S3 credentials needed
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key)
    work = tmp_path / "work"
    work.mkdir()

    def register(i: int) -> subprocess.CompletedProcess:
        out = work / f"registration{i}.json"
        return subprocess.run(
            [
                "defectvlm", "register", "--params", evaluated / "params.yaml", "--run", evaluated / "runs" / "phase1",
                "--reports", evaluated / "reports", "--in", evaluated / "sft", "--out", out,
                "-S", f"tracking.uri={mlflow_server}", "-S", "tracking.experiment=team",
            ],
            cwd=work, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(register, range(4)))
    for done in results:
        assert done.returncode == 0, done.stdout + done.stderr

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    versions = client.search_model_versions("name = 'defectvlm-adapter'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert len({v.run_id for v in versions}) == 4
    candidate = client.get_model_version_by_alias("defectvlm-adapter", "candidate")
    assert candidate.version in {v.version for v in versions}
    assert client.get_registered_model("defectvlm-adapter").aliases == {"candidate": candidate.version}
    assert [m.name for m in client.search_registered_models()] == ["defectvlm-adapter"]  # no lock left behind
    experiment = client.get_experiment_by_name("team").experiment_id
    parents = client.search_runs([experiment], "tags.`defectvlm.step` = 'pipeline'")
    assert len(parents) == 1  # one pipeline execution, one parent run, however many steps raced to create it
    for v in versions:
        run = client.get_run(v.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"sft.test"}  # every race's loser logged it
    for v in versions:
        files = {Path(f.path).name for f in client.list_artifacts(v.run_id, "adapter")}
        assert {"adapter_model.safetensors", "inference.json"} <= files
    keys = boto3.client("s3", endpoint_url=s3_env["endpoint"]).list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")
    adapters = [k["Key"] for k in keys.get("Contents", []) if k["Key"].endswith("adapter_model.safetensors")]
    # the bucket is shared with the registry's server tests: count this test's runs only
    assert sum(any(f"/{v.run_id}/" in key for key in adapters) for v in versions) == 4
