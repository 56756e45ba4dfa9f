"""A fixed CPU workload that makes times from different machines comparable, and the demo's
table of stage times.

`calibrate()` times the two kinds of work the demo spends its time on: float32 matrix products
in torch (training and scoring) and JPEG decoding in Pillow (every step that reads images),
each a fixed amount of work at a fixed thread count. Its seconds go beside every demo or test
time in benchmarks/RESULTS.md, so "this machine is 1.9x slower" is a ratio of two measured
figures. The stage times come from `DEFECTVLM_STAGE_TIMES`: when that variable names a file,
every pipeline step the CLI runs appends one JSON line (step, seconds) to it (`defectvlm.cli`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

THREADS = 2  # the team's machines have 2 cores; a fixed count keeps the figure comparable
_MATMUL_SIZE, _MATMULS = 1024, 48
_JPEG_SIDE, _JPEG_DECODES = 1024, 60


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate() -> dict:
    """Seconds for the fixed matmul and JPEG work (lower is faster), the CPU model and core count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator)
        b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator)
        torch.mm(a, b)  # warm-up: thread pool and kernel selection
        start = time.perf_counter()
        for _ in range(_MATMULS):
            torch.mm(a, b)
        matmul = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)

    pixels = np.random.default_rng(0).integers(0, 256, (_JPEG_SIDE, _JPEG_SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(_JPEG_DECODES):
        Image.open(io.BytesIO(data)).load()
    jpeg = time.perf_counter() - start
    matmul, jpeg = round(matmul, 3), round(jpeg, 3)
    return {
        "matmul_s": matmul,
        "jpeg_decode_s": jpeg,
        "total_s": round(matmul + jpeg, 3),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": THREADS,
    }


def describe(figures: dict) -> str:
    return (
        f"calibration {figures['total_s']} s (matmul {figures['matmul_s']} s + JPEG decode {figures['jpeg_decode_s']} "
        f"s at {figures['threads']} threads) on {figures['cpu_model']}, {figures['cores']} cores"
    )


def read_stage_times(path: Path) -> list[tuple[str, float, float]]:
    """(step, seconds in the step, seconds since its process started) per recorded run, in order."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["step"], float(row["seconds"]), float(row["process_seconds"])) for row in rows]
