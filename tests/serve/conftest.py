"""The service in-process on a free loopback port (uvicorn in a thread), with the tiny base
model built once per session."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import requests
import uvicorn
from PIL import Image

from defectvlm.config import ServeParams, load_params
from defectvlm.serve.app import create_app
from defectvlm.serve.model import load_scorer
from tests.conftest import REPO

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def image_bytes(size=(96, 64), fmt="PNG", seed: int = 0) -> bytes:
    image = Image.new("RGB", size, (40 + seed * 20 % 200, 90, 120))
    for x in range(0, size[0], 7):
        image.putpixel((x, (x * 3 + seed) % size[1]), (250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextmanager
def running(app, wait_ready: bool = True):
    """Base URL of `app` served on a free loopback port; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    while wait_ready and requests.get(f"{url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def scorer():
    return load_scorer("base", load_params(REPO / "params.yaml"))


@pytest.fixture
def serve(scorer):
    """serve(**serve_params) -> context manager yielding the URL of an app on the shared model."""

    def make(load=None, follow=None, wait_ready=True, **limits):
        return running(create_app(ServeParams(**limits), load or (lambda: scorer), follow), wait_ready)

    return make
