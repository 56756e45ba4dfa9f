"""Training with DeepSpeed on CPU: phases chained, ranks in step, ZeRO-3 saves, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defectvlm.models.families import get_family
from defectvlm.models.loading import load_base
from defectvlm.tracking.lineage import file_md5
from defectvlm.tracking.mlflow_tracking import MlflowTracking
from defectvlm.train.artifacts import ADAPTER_FILE, PROMPT_FILE, load_trained
from defectvlm.train.build import build_model
from defectvlm.train.distributed import weights_digest
from defectvlm.train.loop import fit_phase
from defectvlm.train.phases import apply_phase, canonical
from tests.conftest import REPO, write_params
from tests.train.conftest import train_overrides

pytestmark = pytest.mark.slow
FAMILY = get_family("qwen2_5_vl")


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def reloaded_digest(params, best: Path) -> str:
    """Weights digest of a fresh model with best/ loaded (same naming as the training digest)."""
    base, _ = load_base(params.model)
    phase = params.train.phase(read(best / "phase.json")["phase"])
    model = apply_phase(base, FAMILY, phase, params.train.lora)
    load_trained(model, best)
    return weights_digest([(canonical(n), p) for n, p in model.named_parameters() if p.requires_grad])


def full_weights(best: Path) -> dict:
    """The adapter's modules saved whole (PEFT modules_to_save), by base-model name."""
    return {canonical(k): v for k, v in load_file(str(best / ADAPTER_FILE)).items() if ".lora_" not in k}


def test_three_phases_chain_log_to_mlflow_and_describe_themselves(sft_dir, train_params):
    _, params = train_params()
    tracking = MlflowTracking(params, sft_dir)
    for number in (1, 2, 3):
        metrics = fit_phase(params, number, sft_dir, tracking=tracking)
        assert metrics["steps"] == params.train.phase(number).max_steps
        out = Path(params.train.output_dir) / f"phase{number}"
        for name in ("metrics.json", "trainable.json", "params.json", "phase.json"):
            assert (out / name).exists(), name
        best = out / "best"
        for name in (ADAPTER_FILE, "adapter_config.json", PROMPT_FILE, "phase.json", "tokenizer.json"):
            assert (best / name).exists(), name
        assert 0.5 < metrics["token_efficiency"] <= 1
        assert read(best / "phase.json")["starts_from"] == (
            None if number == 1 else str(out.parent / f"phase{number - 1}" / "best")
        )
        if number == 1:
            phase1_projector = full_weights(best)
            assert phase1_projector and all(k.startswith("model.visual.merger.") for k in phase1_projector)

    # phase 2 starts from phase 1's projector (carried over, not re-initialised)
    model, *_ = build_model(params, 2, params.train.phase2)
    loaded = {canonical(n): p for n, p in model.named_parameters()}
    fresh, _ = load_base(params.model)
    fresh_params = dict(fresh.named_parameters())
    for name, tensor in phase1_projector.items():
        assert torch.equal(loaded[name], tensor)
        assert not torch.equal(fresh_params[name], tensor)
    phase3_weights = full_weights(Path(params.train.output_dir) / "phase3" / "best")
    assert any(k.startswith("model.visual.blocks.3.") for k in phase3_weights)
    assert not any(k.startswith(("model.visual.blocks.0.", "model.visual.blocks.2.")) for k in phase3_weights)

    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert sorted(r.info.run_name for r in runs)[1:] == ["train_phase1", "train_phase2", "train_phase3"]
    (parent,) = [r for r in runs if r.data.tags["defectvlm.step"] == "pipeline"]
    phase1 = next(r for r in runs if r.info.run_name == "train_phase1")
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    assert parent.data.params["train.phase1.lr_lm"] == str(params.train.phase1.lr_lm)
    digests = {d.dataset.name: d.dataset.digest for d in phase1.inputs.dataset_inputs}
    assert digests == {"sft.train": file_md5(sft_dir / "train.jsonl"), "sft.val": file_md5(sft_dir / "val.jsonl")}
    assert parent.data.tags["data.sft.test.md5"] == file_md5(sft_dir / "test.jsonl")
    assert int(phase1.data.params["trainable.projector.base"]) > 0
    assert phase1.data.params["trainable.vision_blocks.base"] == "0"
    assert "loss" in phase1.data.metrics and "token_efficiency" in phase1.data.metrics


def test_disabled_phase_is_skipped_and_the_next_starts_from_the_last_run(sft_dir, train_params):
    _, params = train_params(phase2={"enabled": False, "vision_lora_top_n": 2})
    fit_phase(params, 1, sft_dir)
    assert fit_phase(params, 2, sft_dir) == {"phase": 2, "enabled": False}
    fit_phase(params, 3, sft_dir)
    runs = Path(params.train.output_dir)
    assert read(runs / "phase3" / "best" / "phase.json")["starts_from"] == str(runs / "phase1" / "best")


def test_zero3_saves_a_complete_adapter_that_reloads_to_the_same_tensors(sft_dir, train_params):
    _, params = train_params(deepspeed=str(REPO / "configs" / "deepspeed" / "zero3.json"), eval_steps=3)
    metrics = fit_phase(params, 1, sft_dir)
    best = Path(params.train.output_dir) / "phase1" / "best"
    adapter = load_file(str(best / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert metrics["best_step"] == metrics["steps"] == 3
    assert reloaded_digest(params, best) == metrics["weights_digest_per_rank"][0]


def _cli(params_path: Path, *extra: str, torchrun: int = 0) -> list[str]:
    args = ["train", "--phase", "1", "--params", str(params_path), "--in", str(extra[0]), *extra[1:]]
    if torchrun:
        return [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node",
            str(torchrun),
            "-m",
            "defectvlm",
            *args,
        ]
    return [sys.executable, "-m", "defectvlm", *args]


def test_torchrun_two_ranks_zero2_end_with_identical_weights(sft_dir, tmp_path):
    path = write_params(tmp_path / "params.yaml", train_overrides(tmp_path, phase1={"max_steps": 3}))
    done = subprocess.run(_cli(path, sft_dir, "--no-tracking", torchrun=2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read(tmp_path / "runs" / "phase1" / "metrics.json")
    assert metrics["world_size"] == 2
    digests = metrics["weights_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_kill_9_mid_phase_then_resume_matches_an_uninterrupted_run(sft_dir, tmp_path):
    overrides = dict(phase1={"max_steps": 10}, save_steps=2, eval_steps=10, save_total_limit=3)
    straight = write_params(tmp_path / "straight.yaml", train_overrides(tmp_path / "straight", **overrides))
    done = subprocess.run(_cli(straight, sft_dir, "--no-tracking"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = write_params(tmp_path / "killed.yaml", train_overrides(tmp_path / "killed", **overrides))
    latest = tmp_path / "killed" / "runs" / "phase1" / "checkpoints" / "latest"
    process = subprocess.Popen(
        _cli(killed, sft_dir, "--no-tracking"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-000004"):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "runs" / "phase1" / "metrics.json").exists()  # it really died mid-phase

    resumed = subprocess.run(
        _cli(killed, sft_dir, "--no-tracking", "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = read(tmp_path / "straight" / "runs" / "phase1" / "metrics.json")
    b = read(tmp_path / "killed" / "runs" / "phase1" / "metrics.json")
    assert a["steps"] == b["steps"] == 10
    # tolerance: none. On CPU in fp32 the resumed run is bit-identical (weights digest equal).
    assert a["weights_digest_per_rank"] == b["weights_digest_per_rank"]
    assert a["history"] == b["history"]


def test_worker_processes_change_nothing_that_is_trained(sft_dir, train_params):
    """The same params with train.num_workers 0 and 2: the same batches, losses and weights
    (LoRA dropout on: its masks come from the global RNG, which the loader must not draw from)."""
    runs = []
    for workers in (0, 2):
        overrides = dict(batch_size=4, eval_steps=4, phase1={"max_steps": 8}, lora={"dropout": 0.1})
        _, params = train_params(num_workers=workers, **overrides)  # 6 micro-batches an epoch: 8 cross into the next
        runs.append(fit_phase(params, 1, sft_dir))
    inline, workers = runs
    assert len(inline["history"]) == 2 and inline["steps_per_epoch"] == 6
    assert inline["history"] == workers["history"]
    assert inline["weights_digest_per_rank"] == workers["weights_digest_per_rank"]
    assert inline["tokens"] == workers["tokens"] and inline["token_efficiency"] == workers["token_efficiency"]


def test_roi_f1_type_keeps_the_checkpoint_that_finds_and_names(sft_dir, train_params):
    """metric_for_best_model: roi_f1_type: every evaluation logs the scoring pass's ROI-F1, the
    defect-type accuracy and their mean; best/ is the step with the highest mean."""
    _, params = train_params(eval_steps=1, metric_for_best_model="roi_f1_type", phase1={"max_steps": 3})
    metrics = fit_phase(params, 1, sft_dir)
    history = [entry for entry in metrics["history"] if "roi_f1_type" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3]
    for entry in history:
        assert 0 <= entry["type_accuracy"] <= 1
        assert entry["roi_f1_type"] == pytest.approx((entry["roi_f1"] + entry["type_accuracy"]) / 2)
    best = max(history, key=lambda entry: entry["roi_f1_type"])
    assert metrics["best_step"] == best["step"] and metrics["roi_f1_type"] == best["roi_f1_type"]
    saved = read(Path(params.train.output_dir) / "phase1" / "best" / "phase.json")
    assert saved["step"] == best["step"]
