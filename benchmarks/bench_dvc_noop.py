"""`dvc repro` with nothing changed, after `make demo` (issue 6: every stage skipped in <= 10 s).

    python benchmarks/bench_dvc_noop.py [--repeat 5]

Runs `dvc repro` in the repository root; the first call may still have work to do (it is
reported, not timed); then times `--repeat` calls that must run no stage.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repro() -> tuple[float, list[str]]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    done = subprocess.run(["dvc", "repro"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return seconds, [line for line in done.stdout.splitlines() if line.startswith("Running stage")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    first, ran = repro()
    print(f"first dvc repro: {first:.1f} s, ran {len(ran)} stages")
    times = []
    for _ in range(args.repeat):
        seconds, ran = repro()
        if ran:
            sys.exit(f"a no-op dvc repro ran stages: {ran}")
        times.append(seconds)
    print(f"{platform.machine()}, {os.cpu_count()} cores; no-op dvc repro over {len(times)} runs:")
    print(f"  median {statistics.median(times):.2f} s, max {max(times):.2f} s (goal <= 10 s)")


if __name__ == "__main__":
    main()
