"""`mlflow models serve` of the logged pyfunc, for real on loopback: start it, POST, check."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest
import requests

from defectvlm.config import load_params
from defectvlm.serve.pyfunc import log_inspection_model
from tests.conftest import REPO
from tests.serve.conftest import b64, free_port, image_bytes


@pytest.mark.slow
def test_mlflow_models_serve_answers_per_region_rows(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_inspection_model("base", load_params(REPO / "params.yaml"))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", info.model_uri, "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not become ready"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        records = [
            {"image": b64(image_bytes()), "boxes": '[{"xyxy": [1, 1, 30, 30]}, {"xyxy": [40, 5, 90, 60]}]'},
            {"image": b64(image_bytes((80, 60), seed=2)), "boxes": None},
        ]
        response = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=120)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        # the second image has no boxes: predict's default grid (quarter-image windows for the base)
        assert [(r["image_index"], r["region"]) for r in rows] == [(0, 1), (0, 2)] + [(1, i) for i in range(1, 17)]
        assert rows[0]["xyxy"] == [1, 1, 30, 30] and rows[2]["xyxy"] == [0, 0, 20, 15]
        assert all(0 <= r["p_abnormal"] <= 1 and r["uri"] == "base" and r["version"] is None for r in rows)
        for image_index in (0, 1):
            mine = [r for r in rows if r["image_index"] == image_index]
            assert {r["image_score"] for r in mine} == {max(r["p_abnormal"] for r in mine)}

        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "%%"}]}, timeout=60)
        assert bad.status_code == 400 and "row 0: image: not valid base64" in bad.text
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
