"""`defectvlm serve` as a subprocess: binds loopback by default, serves, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import REPO
from tests.serve.conftest import b64, free_port, image_bytes, running


@pytest.mark.slow
def test_defectvlm_serve_binds_loopback_and_answers(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEFECTVLM_SERVE_TOKEN", None)
    command = [sys.executable, "-m", "defectvlm", "serve", "--params", str(REPO / "params.yaml"), "--model", "base"]
    server = subprocess.Popen(
        [*command, "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "not ready in time"
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        body = {"image": b64(image_bytes()), "boxes": [{"xyxy": [1, 1, 30, 30]}]}
        answer = requests.post(f"{url}/v1/inspect", json=body, timeout=60).json()
        assert answer["model"] == {"uri": "base", "version": None} and len(answer["regions"]) == 1
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=60)[0].decode()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output
    assert "POST /v1/inspect -> 200" in output
    assert b64(image_bytes())[:24] not in output


def test_a_model_that_cannot_be_loaded_is_reported_by_readyz_not_a_crash():
    from defectvlm.config import load_params
    from defectvlm.serve.run import build_app

    app = build_app(load_params(REPO / "params.yaml"), "models:/nothing-here/3")  # a pinned version: not followed
    with running(app, wait_ready=False) as url:
        deadline = time.monotonic() + 60
        while (answer := requests.get(f"{url}/readyz", timeout=5)).json()["detail"] == "model loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert answer.status_code == 503
        assert answer.json()["detail"].startswith("model failed to load: ")
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
