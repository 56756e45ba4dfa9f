"""CPU training throughput of the tiny model, with and without length-grouped batches.

    python benchmarks/bench_train.py [--sft data/04_sft] [--steps 30] [--batch-size 4]

Runs phase 1 of the real recipe (DeepSpeed ZeRO-2, one process) on the demo SFT data
(`make demo` writes it) twice, `train.group_by_length` on and off, and reports tokens/s
(non-padding tokens per second of training, evaluation excluded) and token efficiency
(non-padding / all tokens in the padded batches). Goal (issue 4): token efficiency ≥ 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from defectvlm.config import load_params, params_from_dict, params_to_dict
from defectvlm.train.loop import fit_phase


def run(sft: Path, steps: int, batch_size: int, grouped: bool, work: Path) -> dict:
    raw = params_to_dict(load_params("params.yaml"))
    raw["train"].update(
        output_dir=str(work / ("grouped" if grouped else "plain")),
        batch_size=batch_size,
        group_by_length=grouped,
        eval_steps=10**6,
        save_steps=10**6,
        logging_steps=10**6,
    )
    raw["train"]["phase1"]["max_steps"] = steps
    metrics = fit_phase(params_from_dict(raw), 1, sft)
    return {
        "group_by_length": grouped,
        "steps": metrics["steps"],
        "token_efficiency": metrics["token_efficiency"],
        "tokens_per_s": round(metrics["tokens"]["real"] / metrics["train_seconds"], 1),
        "train_seconds": metrics["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, default=Path("data/04_sft"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if not (args.sft / "train.jsonl").exists():
        raise SystemExit(f"{args.sft}/train.jsonl not found: run `make demo` first")
    with tempfile.TemporaryDirectory() as work:
        results = [run(args.sft, args.steps, args.batch_size, grouped, Path(work)) for grouped in (True, False)]
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": results}, indent=2))


if __name__ == "__main__":
    main()
