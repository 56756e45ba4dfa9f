"""Batching under concurrent clients, capacity and timeouts, readiness, auth and log hygiene."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serve.conftest import b64, image_bytes

TOKEN = "s3cret-token-for-tests"


def inspect(url: str, picture: bytes, boxes: list, **headers) -> requests.Response:
    body = {"image": b64(picture), "boxes": [{"xyxy": b} for b in boxes]}
    return requests.post(f"{url}/v1/inspect", json=body, headers=headers, timeout=120)


@pytest.mark.slow
def test_eight_clients_times_25_requests_are_all_answered_correctly_in_batches(serve, scorer):
    from defectvlm.serve.model import ImageInput

    pictures = [image_bytes((64 + 8 * c, 48), seed=c) for c in range(8)]
    boxes = [[[1, 1, 20 + c, 20], [30, 5, 60, 40]][: 1 + c % 2] for c in range(8)]
    expected = [
        scorer.score([ImageInput(p, 64 + 8 * c, 48, b)])[0]
        for c, (p, b) in enumerate(zip(pictures, boxes, strict=True))
    ]

    def client(c: int) -> list[dict]:
        return [inspect(url, pictures[c], boxes[c]) for _ in range(25)]

    with serve(max_batch_size=8, max_wait_ms=20, queue_size=64) as url:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(client, range(8)))
        metrics = requests.get(f"{url}/metrics", timeout=10).text
    for c, responses in enumerate(answers):
        assert [r.status_code for r in responses] == [200] * 25
        for response in responses:
            got = response.json()
            assert [r["xyxy"] for r in got["regions"]] == boxes[c]
            for mine, reference in zip(got["regions"], expected[c]["regions"], strict=True):
                assert abs(mine["p_abnormal"] - reference["p_abnormal"]) < 1e-3  # batched = alone
    batches = float(re.search(r"^defectvlm_batch_size_count (\S+)", metrics, re.M).group(1))
    singles = float(re.search(r'^defectvlm_batch_size_bucket\{le="1.0"\} (\S+)', metrics, re.M).group(1))
    assert batches < 200 and singles < batches, (batches, singles)  # batches of more than one happened
    assert 'defectvlm_requests_total{route="/v1/inspect",status="200"} 200.0' in metrics


def metrics(url: str) -> str:
    return requests.get(f"{url}/metrics", timeout=5).text


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


class Gate:
    """The real scorer behind a gate the test opens: a slow model on demand."""

    def __init__(self, scorer):
        self.scorer, self.open = scorer, threading.Event()
        self.version = scorer.version

    def score(self, images):
        self.open.wait(30)
        return self.scorer.score(images)


def test_over_capacity_is_503_with_retry_after_and_nothing_hangs(serve, scorer):
    gate = Gate(scorer)
    with serve(load=lambda: gate, max_batch_size=1, max_wait_ms=0, queue_size=1) as url:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(inspect, url, image_bytes(), [[1, 1, 9, 9]])
            wait_until(lambda: "defectvlm_batch_size_count 1.0" in metrics(url))  # the first is in the model
            second = pool.submit(inspect, url, image_bytes(), [[1, 1, 9, 9]])
            wait_until(lambda: "defectvlm_queue_depth 1.0" in metrics(url))
            refused = inspect(url, image_bytes(), [[1, 1, 9, 9]])
            gate.open.set()
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert "over capacity" in refused.json()["detail"]
            assert first.result().status_code == second.result().status_code == 200


def test_a_request_not_answered_in_time_is_504_and_the_service_recovers(serve, scorer):
    gate = Gate(scorer)
    with serve(load=lambda: gate, request_timeout_s=0.5) as url:
        late = inspect(url, image_bytes(), [[1, 1, 9, 9]])
        assert late.status_code == 504
        assert "serve.request_timeout_s (0.5 s)" in late.json()["detail"]
        gate.open.set()
        assert inspect(url, image_bytes(), [[1, 1, 9, 9]]).status_code == 200


def test_not_ready_until_the_model_is_loaded(serve, scorer):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return scorer

    with serve(load=slow_load, wait_ready=False) as url:
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
        waiting = requests.get(f"{url}/readyz", timeout=5)
        assert waiting.status_code == 503 and waiting.json()["detail"] == "model loading"
        early = inspect(url, image_bytes(), [[1, 1, 9, 9]])
        assert early.status_code == 503 and "still loading" in early.json()["detail"]
        loaded.set()
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200)
        assert inspect(url, image_bytes(), [[1, 1, 9, 9]]).status_code == 200


def test_a_model_that_fails_to_load_is_reported_by_readyz(serve):
    def broken():
        raise RuntimeError("weights missing")

    with serve(load=broken, wait_ready=False) as url:
        wait_until(lambda: "failed" in requests.get(f"{url}/readyz", timeout=5).text)
        answer = requests.get(f"{url}/readyz", timeout=5)
        assert answer.status_code == 503
        assert answer.json()["detail"] == "model failed to load: weights missing"


def test_with_a_token_set_requests_need_it_and_logs_hold_neither_token_nor_image(serve, monkeypatch, caplog):
    monkeypatch.setenv("DEFECTVLM_SERVE_TOKEN", TOKEN)
    picture = image_bytes(seed=5)
    caplog.set_level(logging.DEBUG)
    with serve() as url:
        assert inspect(url, picture, [[1, 1, 9, 9]]).status_code == 401
        wrong = inspect(url, picture, [[1, 1, 9, 9]], Authorization="Bearer nope")
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
        assert inspect(url, picture, [[1, 1, 9, 9]], Authorization=f"Bearer {TOKEN}").status_code == 200
        bad = requests.post(
            f"{url}/v1/inspect", json={"image": b64(picture[:40])}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert bad.status_code == 400
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200  # probes need no token
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /v1/inspect -> 401" in logged and "POST /v1/inspect -> 200" in logged
    assert TOKEN not in logged and b64(picture)[:24] not in logged and b64(picture[:40])[:24] not in logged


def test_without_a_token_no_auth_is_asked(serve, monkeypatch):
    monkeypatch.delenv("DEFECTVLM_SERVE_TOKEN", raising=False)
    with serve() as url:
        assert inspect(url, image_bytes(), [[1, 1, 9, 9]]).status_code == 200
