"""`mlflow models serve -m models:/<name>@candidate` of the version `register` wrote, for real on
loopback: start it, POST, check the rows against the same version scored in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import requests

from defectvlm.config import Params, load_params
from defectvlm.serve.model import ImageInput, load_scorer
from defectvlm.serve.pyfunc import save_inspection_model
from tests.serve.conftest import b64, free_port, image_bytes
from tests.tracking.conftest import evaluated, workspace  # noqa: F401 - fixtures
from tests.tracking.test_registry import NAME, register


@pytest.mark.slow
def test_mlflow_models_serve_answers_per_region_rows_of_the_registered_version(workspace):  # noqa: F811
    version = register(workspace)
    params = load_params(workspace / "params.yaml")
    port = free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # MLflow execs `uvicorn`
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking.uri, "OMP_NUM_THREADS": "1", "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@candidate"]
    server = subprocess.Popen(
        [*command, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a loaded machine
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not become ready"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pictures = [image_bytes(), image_bytes((80, 60), seed=2)]
        records = [
            {"image": b64(pictures[0]), "boxes": '[{"xyxy": [1, 1, 30, 30]}, {"xyxy": [40, 5, 90, 60]}]'},
            {"image": b64(pictures[1]), "boxes": None},  # no boxes: predict's default grid
        ]
        response = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=300)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]

        # the registered version itself (not the base), as `defectvlm serve` and `predict` judge it
        scorer = load_scorer(f"models:/{NAME}/{version}", params)
        inputs = [
            ImageInput(pictures[0], 96, 64, [[1, 1, 30, 30], [40, 5, 90, 60]]),
            ImageInput(pictures[1], 80, 60, None),
        ]
        expected = [(i, region) for i, record in enumerate(scorer.score(inputs)) for region in record["regions"]]
        assert len(expected) > 2 + 8  # the grid needs more than one prompt
        assert [(r["image_index"], r["region"]) for r in rows] == [(i, region["id"]) for i, region in expected]
        for row, (_, region) in zip(rows, expected, strict=True):
            assert row["xyxy"] == region["xyxy"]
            assert (row["cls"] if isinstance(row["cls"], str) else None) == region["cls"]  # pandas: NaN for None
            assert row["p_abnormal"] == pytest.approx(region["p_abnormal"], abs=1e-6)
        assert {(r["uri"], r["version"]) for r in rows} == {
            (f"models:/{NAME}/{version}", str(version))
        }  # MLflow names versions by strings
        for image_index in (0, 1):
            mine = [r for r in rows if r["image_index"] == image_index]
            assert {r["image_score"] for r in mine} == {max(r["p_abnormal"] for r in mine)}

        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "%%"}]}, timeout=60)
        assert bad.status_code == 400 and "row 0: image: not valid base64" in bad.text
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_saved_models_requirements_pin_defectvlm_and_carry_the_projects_constraints(tmp_path):
    folder = save_inspection_model(tmp_path / "model", f"models:/{NAME}/1", Params())
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert f"defectvlm=={version('defectvlm')}" in requirements and "-c constraints.txt" in requirements
    project = (Path(__file__).parents[2] / "constraints.txt").read_text().splitlines()
    pins = [line for line in project if line.strip() and not line.startswith("#")]
    assert (folder / "constraints.txt").read_text().splitlines() == pins
