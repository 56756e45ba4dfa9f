"""Serving throughput and latency on loopback (tiny base model, CPU): /v1/inspect with dynamic
batching on and off, and a one-request-at-a-time endpoint that generates the answer.

    python benchmarks/bench_serve.py [--requests 32] [--concurrency 1 4 16]

Each configuration is a `defectvlm serve --model base` subprocess on a free loopback port;
clients are threads in this process, each image carries 8 regions. Bounded: `--requests` per
concurrency level. Goals (issue 16): nothing dropped, no 5xx; batching >= 1.5x the unbatched
throughput at 16 clients; scoring >= 5x the generating endpoint.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from PIL import Image

BOXES = [[x, y, x + 60, y + 50] for x in (10, 90, 170, 250) for y in (20, 120)]  # 8 regions
ANSWER = "\n".join(f"R{i}: abnormal | streak" for i in range(1, 9))  # what a correct model writes


def picture(seed: int) -> str:
    image = Image.new("RGB", (320, 200), (60 + seed % 100, 90, 110))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(settings: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "defectvlm", "serve", "--model", "base", "--port", str(port)]
    for setting in settings:
        command += ["-S", setting]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("DEFECTVLM_SERVE_TOKEN", None)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return server, url
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading (a loaded machine)
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become ready")


def inspect(url: str, seed: int) -> tuple[int, float]:
    body = {"image": picture(seed), "boxes": [{"xyxy": b} for b in BOXES]}
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/inspect", json=body, timeout=600)
    return response.status_code, time.perf_counter() - started


def generate(url: str, seed: int, budget: int) -> tuple[int, float]:
    regions = "\n".join(f"R{i}: {box}" for i, box in enumerate(BOXES, start=1))
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{picture(seed)}"}},
        {"type": "text", "text": f"<regions>\n{regions}\n</regions>"},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": budget}
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    return response.status_code, time.perf_counter() - started


def load(call, requests_n: int, clients: int) -> dict:
    call(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(call, range(requests_n)))
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for _, latency in results)
    return {
        "ok": sum(status == 200 for status, _ in results),
        "5xx": sum(status >= 500 for status, _ in results),
        "images_per_s": requests_n / elapsed,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--generate-requests", type=int, default=6)
    parser.add_argument("-S", "--set", action="append", default=[], help="params override for every server")
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {args.requests} requests")
    print(f"per level, 8 regions per image, overrides {args.set}")
    print("| endpoint | clients | ok | 5xx | images/s | p50 s | p95 s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    configurations = {
        "inspect, batching (max 16, 20 ms)": ["serve.max_batch_size=16", "serve.max_wait_ms=20"],
        "inspect, no batching": ["serve.max_batch_size=1"],
    }
    for title, settings in configurations.items():
        server, url = start([*args.set, *settings, "serve.queue_size=64", "serve.request_timeout_s=600"])
        try:
            for clients in args.concurrency:
                row = table[title, clients] = load(lambda seed, url=url: inspect(url, seed), args.requests, clients)
                print(f"| {title} | {clients} | {row['ok']} | {row['5xx']} | {row['images_per_s']:.2f} | "
                      f"{row['p50']:.2f} | {row['p95']:.2f} |")  # fmt: skip
        finally:
            server.terminate()
            server.wait()

    from defectvlm.models.tiny import build_tokenizer

    budget = len(build_tokenizer()(ANSWER)["input_ids"]) + 1
    server, url = start([*args.set, "serve.request_timeout_s=600"])
    try:
        row = load(lambda seed: generate(url, seed, budget), args.generate_requests, 1)
        title = f"chat, generating {budget} tokens, one at a time"
        print(f"| {title} | 1 | {row['ok']} | {row['5xx']} | {row['images_per_s']:.2f} | "
              f"{row['p50']:.2f} | {row['p95']:.2f} |")  # fmt: skip
    finally:
        server.terminate()
        server.wait()
    top = max(args.concurrency)
    batched, single = table["inspect, batching (max 16, 20 ms)", top], table["inspect, no batching", top]
    print(f"batching / no batching at {top} clients: {batched['images_per_s'] / single['images_per_s']:.2f}x")
    print(f"batched scoring / generating endpoint: {batched['images_per_s'] / row['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
