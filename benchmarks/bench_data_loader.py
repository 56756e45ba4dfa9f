"""The training data path: images/s with 0, 2 and 4 DataLoader workers, and whether a CPU
training step waits for its next batch.

    python benchmarks/bench_data_loader.py [--sft data/04_sft] [--workers 0 2 4] [--steps 12]

Without --sft it writes the demo data set (`defectvlm demo-data`: JPEG files of 640-1600 x
600-1200 pixels) and prepares it (ingest -> split -> regions -> build-sft) in a temporary folder.

1. The data path alone: `train.loader.train_loader` over the train split (params.yaml's model
   and batch size; whole images and region crops decoded, cropped and run through the
   processor), one epoch's worth of batches per worker count after 4 warm-up batches. Reports image parts per
   second (a whole image or a crop is one part) and batches per second.
2. Training: phase 1 of the real recipe (DeepSpeed ZeRO-2, one process) for --steps steps,
   train.num_workers 0 and 2, evaluation and checkpoints off. Reports metrics.json's
   data_wait_seconds (time the training process spent waiting for its next batch) against
   train_seconds, per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

from defectvlm.cli import main as cli
from defectvlm.config import load_params, params_from_dict, params_to_dict
from defectvlm.io import read_jsonl
from defectvlm.models.loading import load_base
from defectvlm.train.data import SftDataset, image_parts
from defectvlm.train.loader import stream, train_loader
from defectvlm.train.loop import fit_phase


def prepare(work: Path) -> Path:
    """The demo data set through build-sft; returns the SFT folder."""
    raw = work / "raw"
    assert cli(["demo-data", "--out", str(raw), "--n-abnormal", "40", "--n-normal", "20", "--seed", "3"]) == 0
    raw_params = params_to_dict(load_params("params.yaml"))
    raw_params["data"].update(abnormal_root=str(raw / "abnormal_root"), normal_root=str(raw / "normal_root"))
    params = work / "params.yaml"
    params.write_text(json.dumps(raw_params), encoding="utf-8")  # JSON is YAML
    previous = None
    for step, folder in [("ingest", "01"), ("split", "02"), ("regions", "03"), ("build-sft", "04")]:
        args = [step, "--params", str(params), "--out", str(work / folder)]
        args += ["--quiet"] if step == "ingest" else ["--in", str(work / previous)]
        assert cli(args) == 0, step
        previous = folder
    return work / "04"


def data_path(sft: Path, workers: int) -> dict:
    raw = params_to_dict(load_params("params.yaml"))
    raw["train"]["num_workers"] = workers
    params = params_from_dict(raw)
    _, processor = load_base(params.model)
    dataset = SftDataset(read_jsonl(sft / "train.jsonl"), processor)
    loader = train_loader(dataset, processor, params.train, rank=0, world=1)
    per_epoch = loader.batch_sampler.per_rank
    batches = stream(loader, 0)
    for _ in islice(batches, min(4, per_epoch)):  # warm-up: workers started, files in the page cache
        pass
    cpu0, start = time.process_time(), time.perf_counter()
    parts = n = 0
    for batch in islice(batches, per_epoch):  # one epoch's worth, as training reads them
        n += 1
        parts += int(batch["image_grid_thw"].shape[0])
    seconds = time.perf_counter() - start
    per_sample = sum(len(image_parts(s)) for s in dataset.samples) / len(dataset.samples)
    return {
        "num_workers": workers,
        "batches": n,
        "image_parts": parts,
        "image_parts_per_sample": round(per_sample, 2),
        "images_per_s": round(parts / seconds, 1),
        "batches_per_s": round(n / seconds, 2),
        "main_process_cpu_s": round(time.process_time() - cpu0, 2),
        "seconds": round(seconds, 2),
    }


def training(sft: Path, workers: int, steps: int, work: Path) -> dict:
    raw = params_to_dict(load_params("params.yaml"))
    raw["train"].update(
        output_dir=str(work / f"workers{workers}"),
        num_workers=workers,
        eval_steps=10**6,
        save_steps=10**6,
        logging_steps=10**6,
    )
    raw["train"]["phase1"]["max_steps"] = steps
    metrics = fit_phase(params_from_dict(raw), 1, sft)
    return {
        "num_workers": workers,
        "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"],
        "data_wait_seconds": metrics["data_wait_seconds"],
        "step_s": round(metrics["train_seconds"] / metrics["steps"], 3),
        "wait_per_step_s": round(metrics["data_wait_seconds"] / metrics["steps"], 3),
        "wait_share": round(metrics["data_wait_seconds"] / metrics["train_seconds"], 3),
        "weights_digest": metrics["weights_digest_per_rank"][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, help="SFT folder (default: the demo data set, prepared here)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (0: skip part 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft = args.sft or prepare(work / "data")
        loading = [data_path(sft, workers) for workers in args.workers]
        trained = [training(sft, workers, args.steps, work) for workers in (0, 2)] if args.steps else []
        samples = len(read_jsonl(sft / "train.jsonl"))
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()}",
        "train_samples": samples,
        "data_path": loading,
        "training": trained,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
