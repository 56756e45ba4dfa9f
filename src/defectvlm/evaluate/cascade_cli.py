"""`evaluate-cascade`: load the VLM (--run) and the detector (--detector), judge val and test."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from defectvlm.config import Params
from defectvlm.errors import StepFailure

console = Console(stderr=True, soft_wrap=True)


def run_cascade(params: Params, run: str, detector: str | None, split_dir: str, out: str) -> int:
    from defectvlm.detector.loading import open_detector
    from defectvlm.evaluate.cascade import evaluate_cascade
    from defectvlm.evaluate.run import resolve_run
    from defectvlm.inference.loading import load_model
    from defectvlm.io import read_splits

    best = resolve_run(params, run)
    if best is None:
        raise StepFailure("evaluate-cascade needs a trained VLM: name a phase with --run (not base)")
    proposer = open_detector(detector, params)
    loaded = load_model(best)
    splits = read_splits(split_dir, ("val", "test"))
    out = Path(out)
    metrics = evaluate_cascade(params, loaded, proposer, splits, out)
    for name in ("detector", "cascade", "agree"):
        m = metrics[name]
        console.print(
            f"{name}: precision {m['precision']}, recall {m['recall']}, F1 {m['f1']}, "
            f"false alarms/image {m['false_alarms_per_image']} (threshold {m['threshold']} from val)"
        )
    console.print(f"proposal recall at the budget: {metrics['proposals']['recall_at_budget']}; {out}/cascade_report.md")
    return 0
