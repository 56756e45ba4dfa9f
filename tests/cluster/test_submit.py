"""`defectvlm pipeline submit` against a KFP API server stand-in on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import REPO, run_cli, write_params


class FakeKfp(BaseHTTPRequestHandler):
    """The v2beta1 endpoints kfp.Client uses to start a run: healthz, experiments (list, create), runs (create)."""

    received: list[dict] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        url = urlparse(self.path)
        request = {
            "method": self.command,
            "path": url.path,
            "query": parse_qs(url.query),
            "auth": self.headers.get("Authorization"),
            "body": json.loads(self.rfile.read(length)) if length else None,
        }
        self.received.append(request)
        return request

    def do_GET(self):
        request = self._record()
        if request["path"] == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        elif request["path"] == "/apis/v2beta1/experiments":
            self._reply({})  # no experiment of that name yet
        else:
            self.send_error(404)

    def do_POST(self):
        request = self._record()
        if request["path"] == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "exp-7", "display_name": request["body"]["display_name"]})
        elif request["path"] == "/apis/v2beta1/runs":
            self._reply({"run_id": "run-42", "display_name": request["body"]["display_name"]})
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_server():
    FakeKfp.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.received
    server.shutdown()
    thread.join()


def test_submit_creates_a_run_of_the_compiled_pipeline_with_the_params_as_arguments(
    kfp_server, tmp_path, monkeypatch, capsys
):
    url, received = kfp_server
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    params = write_params(tmp_path / "params.yaml", {"registry": {"model_name": "weld-adapter"}})

    code = run_cli(
        "pipeline", "submit", "--params", params, "--host", url, "--experiment", "weld-lines",
        "--run-name", "nightly", "--data-version", "abc123", "-S", "train.phase1.max_steps=7",
        "-S", "cluster.service_account=trainer-bot",
    )  # fmt: skip

    assert code == 0
    assert capsys.readouterr().out.strip().endswith(f"{url}/#/runs/details/run-42")
    assert {r["auth"] for r in received} == {"Bearer secret-token"}
    (created,) = [r for r in received if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert created["body"]["display_name"] == "weld-lines"
    (run,) = [r["body"] for r in received if r["path"] == "/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-7" and run["display_name"] == "nightly"
    assert run["service_account"] == "trainer-bot"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "defectvlm-finetune"
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    arguments = run["runtime_config"]["parameters"]
    assert arguments["data_version"] == "abc123"
    assert arguments["train"]["phase1"]["max_steps"] == 7 and arguments["registry"]["model_name"] == "weld-adapter"
    assert "cluster" not in arguments  # compiled in, not a run parameter


def test_submit_without_host_and_run_without_local_are_usage_errors(monkeypatch):
    monkeypatch.chdir(REPO)
    assert run_cli("pipeline", "submit") == 2
    assert run_cli("pipeline", "run") == 2
