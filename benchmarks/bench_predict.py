"""`predict` images/s vs a per-image `generate` loop (the seeds' inference scripts), tiny model, CPU.

    python benchmarks/bench_predict.py --model runs/phase3 --images data/raw/... [--limit 8]

Both paths judge the same images and the same candidate regions (the default grid); the loop
builds one prompt per region chunk and decodes greedily up to the answer's length, one image
at a time, as the seeds do. Goal (issue 15): predict >= 5x the loop's images/s. Both wall
and CPU time are reported: run with OMP_NUM_THREADS=1 so that the CPU time is the work.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from defectvlm.data.images import load_upright
from defectvlm.evaluate.scoring import generate_answers
from defectvlm.inference.loading import load_model
from defectvlm.inference.predict import predict_images, region_prompt_sample
from defectvlm.inference.sources import find_images, grid_windows


def generate_loop(loaded, images) -> None:
    config, prompt = loaded.config, loaded.config.prompt
    for path in images:
        width, height = load_upright(str(path)).size
        boxes = [r.in_pixels(width, height) for r in grid_windows(width, height, prompt["window"])]
        step = prompt["window"]["max_regions"]
        for first in range(0, len(boxes), step):
            chunk = boxes[first : first + step]
            sample = region_prompt_sample(
                path.name,
                str(path),
                width,
                height,
                chunk,
                [("normal", None)] * len(chunk),
                prompt,
                config.family,
                config.min_pixels,
                config.max_pixels,
            )
            budget = len(loaded.processor.tokenizer(sample["messages"][2]["content"])["input_ids"]) + 1
            generate_answers(loaded.model, loaded.processor, [sample], budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu")
    images = find_images(args.images)[: args.limit]
    threshold = loaded.config.threshold if loaded.config.threshold is not None else 0.5
    predict_images(loaded, images[:1], None, threshold, args.batch_size, progress=False)  # warm-up
    generate_loop(loaded, images[:1])
    load_before = os.getloadavg()
    predict_s, predict_cpu = timed(lambda: predict_images(loaded, images, None, threshold, args.batch_size, False))
    loop_s, loop_cpu = timed(lambda: generate_loop(loaded, images))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"load average before / after: {load_before} / {os.getloadavg()}")
    print(f"images: {len(images)}, torch threads: {__import__('torch').get_num_threads()}")
    print(f"predict: {len(images) / predict_s:.3f} images/s ({predict_s:.1f} s wall, {predict_cpu:.1f} s CPU)")
    print(f"generate loop: {len(images) / loop_s:.3f} images/s ({loop_s:.1f} s wall, {loop_cpu:.1f} s CPU)")
    print(f"speed-up: {loop_s / predict_s:.1f}x wall, {loop_cpu / predict_cpu:.1f}x CPU time")


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    measure of the work itself (one torch thread), the wall time also counts the waiting."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
