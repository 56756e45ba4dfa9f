"""`defectvlm evaluate`: score val (to pick the threshold) and the chosen split (to report),
for the fine-tuned run and for the untrained base, and write the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from defectvlm.config import Params
from defectvlm.errors import StepFailure
from defectvlm.evaluate.metrics import best_threshold, evaluate_rows
from defectvlm.evaluate.report import write_gallery, write_plots, write_report
from defectvlm.evaluate.scoring import generate_answers, image_scores, parse_answer, region_row, score_samples
from defectvlm.inference.loading import load_model
from defectvlm.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from defectvlm.models.loading import load_base
from defectvlm.train.artifacts import read_phase_info

INFERENCE_FILE = "inference.json"


def resolve_run(params: Params, run: str) -> Path | None:
    """'base' -> None; 'last' -> the best/ of the last enabled phase; else a phase dir or its best/."""
    if run == "base":
        return None
    if run == "last":
        enabled = [n for n in (1, 2, 3) if params.train.phase(n).enabled]
        run = str(Path(params.train.output_dir) / f"phase{enabled[-1]}")
    path = Path(run)
    best = path / "best" if (path / "best").exists() else path
    read_phase_info(best)
    return best


def load_for_evaluation(params: Params, best: Path | None):
    """(model, processor) of a phase's best/, or of the untrained base when `best` is None."""
    if best is None:
        return load_base(params.model)
    loaded = load_model(best)  # the one way to load a trained model
    return loaded.model, loaded.processor


def score_split(model, processor, samples: list[dict], classes: list[str], mode: str) -> tuple[list[dict], dict]:
    if mode == "score":
        return score_samples(model, processor, samples, classes), {}
    answers = generate_answers(model, processor, samples)
    rows, missing, unknown = [], 0, 0
    for sample, answer in zip(samples, answers, strict=True):
        regions = sample["meta"]["regions"]
        parsed = parse_answer(answer, [r["rid"] for r in regions], classes)
        missing += len(parsed["missing"])
        unknown += parsed["unknown_classes"]
        for region in regions:
            label, cls = parsed["regions"].get(region["rid"], ("normal", None))
            row = region_row(sample, region, 1.0 if label == "abnormal" else 0.0)
            row["answer_parsed"] = region["rid"] in parsed["regions"]
            if region["label"] == "abnormal":
                row["pred_cls"] = cls or "unparsed"
            rows.append(row)
    return rows, {"unparsed_regions": missing, "unknown_classes": unknown, "answers": len(answers)}


def evaluate_model(
    model, processor, sft_dir: Path, split: str, classes: list[str], mode: str
) -> tuple[dict, list[dict]]:
    val = read_jsonl(sft_dir / "val.jsonl")
    target = read_jsonl(sft_dir / f"{split}.jsonl")
    started = time.perf_counter()
    val_rows, _ = score_split(model, processor, val, classes, mode)
    threshold, val_f1 = best_threshold(
        [int(r["truth"] == "abnormal") for r in val_rows], [r["score"] for r in val_rows]
    )
    if mode == "generate":
        threshold = 0.5  # generated answers are 0/1 already
    rows, parse_counts = score_split(model, processor, target, classes, mode)
    metrics = evaluate_rows(rows, image_scores(rows), threshold, classes)
    metrics.update(val_best_roi_f1=round(val_f1, 4), seconds=round(time.perf_counter() - started, 2), **parse_counts)
    return metrics, rows


def evaluate(
    params: Params, run: str, sft_dir: Path, out: Path, split: str = "test", mode: str = "score", baseline: bool = True
) -> dict:
    summary_path = sft_dir / "sft_summary.json"
    if not summary_path.exists():
        raise StepFailure(f"{summary_path} not found: run build-sft first")
    classes = json.loads(summary_path.read_text(encoding="utf-8"))["classes"]
    best = resolve_run(params, run)
    model, processor = load_for_evaluation(params, best)
    result, rows = evaluate_model(model, processor, sft_dir, split, classes, mode)
    metrics = {
        "run": str(best.parent if best else "base"),
        "split": split,
        "mode": mode,
        "classes": classes,
        split: result,  # named after the evaluated split
        "val_best_roi_f1": result["val_best_roi_f1"],
    }
    if baseline and best is not None:
        base_model, base_processor = load_for_evaluation(params, None)
        metrics["baseline"], _ = evaluate_model(base_model, base_processor, sft_dir, split, classes, mode)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(rows, result, out)
    gallery = write_gallery(rows, result["threshold"], out)
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "metrics.json", metrics)
    write_report(metrics, plots, gallery, out)
    # The adapter's inference config. It lives here, not in best/: that folder is the training
    # stage's DVC output, and the register step ships both together.
    write_json_atomic(
        out / INFERENCE_FILE,
        {"run": metrics["run"], "threshold": result["threshold"], "chosen_on": "val", "mode": mode, "classes": classes},
    )
    return metrics
