"""Ingest throughput: N and 2N realistic JPEGs, against the full-decode approach.

    python benchmarks/bench_ingest.py [--n 5000] [--work benchmarks/_work]

Writes 2N JPEGs of 1600x1200 with a noisy powder-bed texture (~0.8 MB each; half of them
abnormal with semicolon labels) in two halves, then times `defectvlm ingest` (header reads,
end-marker check, BLAKE3 content hash, manifest and report) over the first half (N) and over
both (2N), and times a full decode (`Image.open(p).convert("RGB")`, what the seed scripts do)
on a sample. Files stay in the page cache (warm reads): the numbers measure CPU cost, not the disk.
Goals (2 cores): >= 3,000 images/s, >= 50x the full decode, 2N costing <= 2.2x N.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from defectvlm.cli import main as cli_main

WIDTH, HEIGHT = 1600, 1200
N_BASES = 32  # distinct encoded textures; each file gets a unique JPEG comment so every hash differs


def texture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    light = 110 + 40 * np.sin(x / WIDTH * np.pi * rng.uniform(0.5, 1.5)) * np.cos(y / HEIGHT * rng.uniform(0.5, 2))
    grain = rng.normal(0, 28, (HEIGHT, WIDTH)).astype(np.float32)
    lines = 6 * np.sin(y * rng.uniform(0.3, 0.6))
    gray = np.clip(light + grain + lines, 0, 255).astype(np.uint8)
    rgb = np.stack([gray, gray, (gray * 0.95).astype(np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=84)
    return buffer.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    payload = text.encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def write_tree(work: Path, n_total: int) -> None:
    bases = [texture(i) for i in range(N_BASES)]
    rng = np.random.default_rng(0)
    for i in range(n_total):
        half = "part1" if i < n_total // 2 else "part2"
        abnormal = i % 2 == 0
        root = work / ("abnormal_root" if abnormal else "normal_root") / half / f"batch_{i % 20:02d}"
        root.mkdir(parents=True, exist_ok=True)
        name = f"img_{i:06d}"
        (root / f"{name}.jpg").write_bytes(with_comment(bases[i % N_BASES], f"defectvlm-bench {i}"))
        if abnormal:
            x, y = rng.integers(0, WIDTH - 200), rng.integers(0, HEIGHT - 200)
            (root / f"{name}.txt").write_text(f"{name}.jpg；{x},{y},{x + 120},{y + 80}；灰渣\r\n", encoding="gbk")


def write_params(work: Path, subdir: str, workers: int = 0) -> Path:
    """A params file for the N (subdir 'part1') or 2N (subdir '') tree."""
    params = work / f"params_{subdir or 'all'}.yaml"
    roots = {f"{kind}_root": str(work / f"{kind}_root" / subdir) for kind in ("abnormal", "normal")}
    params.write_text(
        json.dumps({"data": roots, "labels": {"label_map": {"灰渣": "slag"}}, "ingest": {"workers": workers}})
    )
    return params


def time_ingest(work: Path, subdir: str, workers: int) -> tuple[float, int]:
    params = write_params(work, subdir, workers)
    out = work / f"out_{subdir or 'all'}"
    start = time.perf_counter()
    code = cli_main(["ingest", "--params", str(params), "--out", str(out), "--quiet"])
    elapsed = time.perf_counter() - start
    report = json.loads((out / "ingest_report.json").read_text())
    assert code == 0 and report["images"]["rejected"] == 0, report["counts"]
    return elapsed, report["images"]["found"]


def median_time(run, repeats: int) -> tuple[float, int]:
    results = sorted(run() for _ in range(repeats))
    return results[len(results) // 2]


def decode(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.convert("RGB").size


def time_decode(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    if workers == 1:
        for p in paths:
            decode(p)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(decode, paths, chunksize=16))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/_work"))
    parser.add_argument("--workers", type=int, default=0, help="ingest.workers (0 = one per core)")
    parser.add_argument("--decode-sample", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="timed ingest runs per size (median)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    args = parser.parse_args()

    work = args.work / f"ingest_{args.n}"
    if not (work / "complete").exists():
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        write_tree(work, 2 * args.n)
        (work / "complete").touch()
        print(f"wrote {2 * args.n} files in {time.perf_counter() - start:.0f} s")
    sizes = [p.stat().st_size for p in (work / "normal_root").rglob("*.jpg")]
    print(f"mean JPEG size {np.mean(sizes) / 1e6:.2f} MB")

    time_ingest(work, "", args.workers)  # warm the page cache once
    t_n, n = median_time(lambda: time_ingest(work, "part1", args.workers), args.repeats)
    t_2n, n2 = median_time(lambda: time_ingest(work, "", args.workers), args.repeats)
    paths = sorted(str(p) for p in (work / "normal_root" / "part1").rglob("*.jpg"))[: args.decode_sample]
    t_dec1 = time_decode(paths, 1) / len(paths)
    t_dec2 = time_decode(paths, os.cpu_count() or 1) / len(paths)

    rate_n, rate_2n = n / t_n, n2 / t_2n
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "n": n,
        "ingest_s_n": round(t_n, 2),
        "ingest_s_2n": round(t_2n, 2),
        "images_per_s_n": round(rate_n),
        "images_per_s_2n": round(rate_2n),
        "cost_ratio_2n_over_n": round(t_2n / t_n, 2),
        "full_decode_images_per_s_1proc": round(1 / t_dec1, 1),
        "full_decode_images_per_s_all_cores": round(1 / t_dec2, 1),
        "speedup_vs_full_decode_1proc": round(rate_n * t_dec1, 1),
        "speedup_vs_full_decode_all_cores": round(rate_n * t_dec2, 1),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
