"""Whole data preparation (ingest -> split -> regions -> build-sft) at N and 2N images.

    python benchmarks/bench_prepare.py [--n 5000] [--work benchmarks/_work]

Uses the same 2N realistic JPEGs as bench_ingest.py (generated once, kept with --keep) and
runs the four steps through the CLI entry point in-process, outputs written to disk, as
`dvc repro` would. Goal (issue 3, 2 cores): >= 1,500 images/s end to end, linear cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from bench_ingest import write_params, write_tree

from defectvlm.cli import main as cli_main

STEPS = ("ingest", "split", "regions", "build-sft")


def run_prepare(work: Path, subdir: str) -> tuple[dict[str, float], int]:
    name = subdir or "all"
    params = write_params(work, subdir)
    out = work / f"prepared_{name}"
    folders = {"ingest": "01_ingested", "split": "02_split", "regions": "03_regions", "build-sft": "04_sft"}
    timings, previous = {}, None
    for step in STEPS:
        args = ["--params", str(params), "--out", str(out / folders[step])]
        args += ["--quiet"] if step == "ingest" else ["--in", str(out / folders[previous])]
        start = time.perf_counter()
        assert cli_main([step, *args]) == 0, step
        timings[step] = time.perf_counter() - start
        previous = step
    report = json.loads((out / "01_ingested" / "ingest_report.json").read_text())
    return timings, report["images"]["in_manifest"]


def median_run(work: Path, subdir: str, repeats: int) -> tuple[dict[str, float], int]:
    runs = sorted((run_prepare(work, subdir) for _ in range(repeats)), key=lambda r: sum(r[0].values()))
    return runs[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/_work"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    args = parser.parse_args()

    work = args.work / f"ingest_{args.n}"
    if not (work / "complete").exists():
        shutil.rmtree(work, ignore_errors=True)
        write_tree(work, 2 * args.n)
        (work / "complete").touch()
    run_prepare(work, "")  # warm the page cache once
    t_n, n = median_run(work, "part1", args.repeats)
    t_2n, n2 = median_run(work, "", args.repeats)
    total_n, total_2n = sum(t_n.values()), sum(t_2n.values())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "n": n,
        "seconds_n": {k: round(v, 2) for k, v in t_n.items()} | {"total": round(total_n, 2)},
        "seconds_2n": {k: round(v, 2) for k, v in t_2n.items()} | {"total": round(total_2n, 2)},
        "images_per_s_n": round(n / total_n),
        "images_per_s_2n": round(n2 / total_2n),
        "cost_ratio_2n_over_n": round(total_2n / total_n, 2),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
