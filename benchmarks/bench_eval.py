"""Scoring pass vs free-text generation on the demo test split (tiny model, CPU).

    python benchmarks/bench_eval.py [--run runs/phase1] [--sft data/04_sft]

Times `score_samples` (one teacher-forced forward per image) and `generate_answers`
(greedy decoding, each answer allowed the reference answer's length, then parsing) on the
same samples. Goal (issue 5): scoring ≥ 10x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from defectvlm.config import load_params
from defectvlm.evaluate.run import load_for_evaluation, resolve_run
from defectvlm.evaluate.scoring import generate_answers, parse_answer, score_samples
from defectvlm.io import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="last")
    parser.add_argument("--sft", type=Path, default=Path("data/04_sft"))
    parser.add_argument("--limit", type=int, default=0, help="only the first N test samples (0: all)")
    args = parser.parse_args()
    params = load_params("params.yaml")
    model, processor = load_for_evaluation(params, resolve_run(params, args.run))
    samples = read_jsonl(args.sft / "test.jsonl")[: args.limit or None]
    classes = json.loads((args.sft / "sft_summary.json").read_text(encoding="utf-8"))["classes"]

    # Each answer may be as long as the reference answer (+1 for the end token): the fastest a
    # model that answers correctly could generate. An untrained model never stops on its own.
    budgets = [len(processor.tokenizer(s["messages"][2]["content"])["input_ids"]) + 1 for s in samples]
    # One warm-up call of each path first: the first forward pays one-time costs (allocations,
    # lazy initialisation) that a long evaluation does not.
    score_samples(model, processor, samples[:4], classes)
    generate_answers(model, processor, samples[:1], budgets[:1])

    start = time.perf_counter()
    rows = score_samples(model, processor, samples, classes)
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    answers = generate_answers(model, processor, samples, budgets)
    generation = time.perf_counter() - start
    unparsed = sum(
        len(parse_answer(a, [r["rid"] for r in s["meta"]["regions"]], classes)["missing"])
        for a, s in zip(answers, samples, strict=True)
    )
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "samples": len(samples),
                "regions": len(rows),
                "scoring_s": round(scoring, 2),
                "generate_s": round(generation, 2),
                "speedup": round(generation / scoring, 1),
                "generated_tokens_budget": sum(budgets),
                "generated_regions_unparsed": unparsed,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
