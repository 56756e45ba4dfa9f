"""ZeRO-3 with two ranks (gloo on CPU): evaluations, a best-model save and a resume run through,
and give the metrics one process gives on the same weights and one rank on the same steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defectvlm.config import load_params
from defectvlm.evaluate.metrics import best_threshold
from defectvlm.evaluate.run import load_for_evaluation
from defectvlm.evaluate.scoring import score_samples
from defectvlm.io import read_jsonl
from defectvlm.train.data import IGNORE_INDEX, Collator, SftDataset
from tests.conftest import REPO, write_params
from tests.train.conftest import train_overrides

pytestmark = pytest.mark.slow
# A hang is the bug this file guards against: a run that takes this long is stuck, not slow.
RUN_TIMEOUT_S = 420


def train(params: Path, sft_dir: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["-m", "defectvlm", "train", "--phase", "1", "--params", str(params), "--in", str(sft_dir), "--no-tracking"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks)]
    launcher = torchrun if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, *args, *extra], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def phase_params(tmp_path: Path, config: str, **train_section) -> Path:
    """2 steps; evaluation (eval_loss and the scoring pass's roi_f1) and a checkpoint every step."""
    overrides = train_overrides(
        tmp_path,
        deepspeed=str(REPO / "configs" / "deepspeed" / f"{config}.json"),
        phase1={"max_steps": 2},
        eval_steps=1,
        save_steps=1,
        metric_for_best_model="roi_f1",
        greater_is_better=True,
        **train_section,
    )
    return write_params(tmp_path / "params.yaml", overrides)


def read_metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "phase1" / "metrics.json").read_text(encoding="utf-8"))


@torch.no_grad()
def one_process_validation(params_path: Path, best: Path, sft_dir: Path) -> dict[str, float]:
    """eval_loss and roi_f1 of best/'s weights in this process: the loss one sample at a time
    (no padding), token-weighted; the scoring pass unsharded."""
    params = load_params(params_path)
    model, processor = load_for_evaluation(params, best)
    model.eval()
    samples = read_jsonl(sft_dir / "val.jsonl")
    dataset, collate = SftDataset(samples, processor), Collator(processor)
    loss_sum = tokens = 0.0
    for item in dataset.items:
        batch = collate([item])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss_sum += float(model(**batch).loss) * n
        tokens += n
    classes = json.loads((sft_dir / "sft_summary.json").read_text(encoding="utf-8"))["classes"]
    rows = score_samples(model, processor, samples, classes)
    roi_f1 = best_threshold([int(r["truth"] == "abnormal") for r in rows], [r["score"] for r in rows])[1]
    return {"eval_loss": loss_sum / tokens, "roi_f1": roi_f1}


@pytest.fixture(scope="module")
def one_rank(sft_dir, tmp_path_factory) -> dict:
    """One rank accumulating 2 micro-batches per step: the same samples per optimizer step as two
    ranks with one each (`batches` deals the epoch's batches round-robin to the ranks)."""
    tmp_path = tmp_path_factory.mktemp("one_rank")
    train(phase_params(tmp_path, "zero3", grad_accum=2), sft_dir, 1)
    return read_metrics(tmp_path)


@pytest.mark.parametrize("config", ["zero3", "zero3_offload"])
def test_two_ranks_evaluate_keep_the_best_and_resume_like_one_rank(sft_dir, tmp_path, config, one_rank):
    params = phase_params(tmp_path, config)
    train(params, sft_dir, 2)
    first = read_metrics(tmp_path)
    assert first["world_size"] == 2 and first["steps"] == 2 and first["skipped_too_long"]["val"] == 0
    assert [entry["step"] for entry in first["history"]] == [1, 2]
    best = tmp_path / "runs" / "phase1" / "best"
    assert json.loads((best / "phase.json").read_text())["step"] == first["best_step"]
    assert len(set(first["weights_digest_per_rank"])) == 1

    # the same weights evaluated by one process: only the sharding and the padding differ,
    # so the loss agrees to float32 rounding (measured: 3e-8 relative) and ROI-F1 exactly
    at_best = next(entry for entry in first["history"] if entry["step"] == first["best_step"])
    alone = one_process_validation(params, best, sft_dir)
    assert at_best["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-6)
    assert at_best["roi_f1"] == pytest.approx(alone["roi_f1"], abs=1e-9)

    resumed = train(params, sft_dir, 2, "--resume")  # from the step-1 checkpoint, evaluated again at 2
    assert "resumed from" in resumed.stderr
    again = read_metrics(tmp_path)
    assert again["history"] == first["history"]
    assert again["weights_digest_per_rank"] == first["weights_digest_per_rank"]

    # One rank trained on the same samples per step: the same arithmetic in another order
    # (gradients averaged across ranks instead of accumulated). Adam's first step divides each
    # gradient element by its own magnitude, which turns last-bit differences in near-zero
    # elements into ~1e-3 relative differences in the loss (measured: 7e-4); counting a step
    # one micro-batch early, or evaluating different samples, moves it by several percent.
    for mine, reference in zip(first["history"], one_rank["history"], strict=True):
        assert mine["step"] == reference["step"]
        assert mine["eval_loss"] == pytest.approx(reference["eval_loss"], rel=2e-3)
        assert mine["roi_f1"] == pytest.approx(reference["roi_f1"], abs=1e-9)
