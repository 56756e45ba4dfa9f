"""`defectvlm train --phase N`: the training recipe, top to bottom.

setup (distributed, base model or the previous phase's best, the phase's trainable
parameters, data, DeepSpeed engine) -> train (steps, logs, evaluation, checkpoints,
best model) -> save (best/, metrics.json, the trainable-parameter table).

One process by default; `torchrun --nproc_per_node N -m defectvlm train ...` runs N data-
parallel ranks (gloo on CPU, NCCL on GPU). `--resume` continues from the last checkpoint
exactly: weights, optimizer, scheduler, RNG states and the position in the data order.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.config import DeepSpeedConfig
from rich.console import Console
from rich.table import Table

from defectvlm.config import Params, PhaseParams, params_to_dict
from defectvlm.data.sft import load_knowledge, load_templates
from defectvlm.errors import StepFailure
from defectvlm.io import read_json_file, read_jsonl, write_json_atomic
from defectvlm.models.families import get_family
from defectvlm.models.loading import load_base
from defectvlm.train.artifacts import load_trained, prompt_config, save_trained, trained_tensors
from defectvlm.train.data import Collator, SftDataset, batches, token_efficiency
from defectvlm.train.distributed import init_distributed, mean_across_ranks, weights_digest
from defectvlm.train.phases import apply_phase, canonical, check_invariants, param_groups, trainable_table
from defectvlm.train.validation import to_device, validation_metrics

console = Console(stderr=True, soft_wrap=True)
CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclass
class TrainerState:
    """What --resume needs beyond DeepSpeed's own checkpoint."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this rank already done in `epoch`
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


# --- setup -----------------------------------------------------------------------------


def phase_dir(params: Params, phase: int) -> Path:
    return Path(params.train.output_dir) / f"phase{phase}"


def starting_point(params: Params, phase: int) -> Path | None:
    """The best/ of the last earlier phase that ran (None for phase 1)."""
    for earlier in range(phase - 1, 0, -1):
        best = phase_dir(params, earlier) / BEST
        if params.train.phase(earlier).enabled:
            if not best.exists():
                raise StepFailure(
                    f"phase {phase} starts from phase {earlier}, but {best} does not exist: train it first"
                )
            return best
    return None


def deepspeed_config(params: Params, world: int) -> dict:
    train = params.train
    config = read_json_file(train.deepspeed, "train.deepspeed")
    if not isinstance(config, dict):
        raise StepFailure(f"{train.deepspeed} (train.deepspeed): a DeepSpeed config is a JSON object")
    filled = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = precision == "bf16" and torch.cuda.is_available()
    config.setdefault("steps_per_print", 10**9)
    try:  # DeepSpeed's own checks, before any model is built
        DeepSpeedConfig(config)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise StepFailure(
            f"{train.deepspeed} (train.deepspeed) is not a valid DeepSpeed config: {exc}. "
            "Fix it (configs/deepspeed/*.json are working examples) or point train.deepspeed at another file"
        ) from None
    return config


def build_model(params: Params, phase_number: int, phase: PhaseParams):
    family = get_family(params.model.family)
    base, processor = load_base(params.model, qlora=params.train.qlora)
    model = apply_phase(base, family, phase, params.train.lora)
    start = starting_point(params, phase_number)
    if start is not None:
        load_trained(model, start)
    if params.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the frozen vision tower's input require grad: the whole tower
        # would be recomputed and back-propagated for nothing (4x slower steps on an H100)
        vision = model.get_base_model().get_submodule(family.vision_tower)
        if hasattr(vision, "get_input_embeddings"):
            vision.get_input_embeddings()._forward_hooks.clear()
    check_invariants(model, family, phase_number, phase)
    return model, processor, family, start


def load_split(params: Params, sft_dir: Path, split: str, processor) -> tuple[SftDataset, int]:
    samples = read_jsonl(sft_dir / f"{split}.jsonl")
    if samples and "meta" not in samples[0]:
        raise StepFailure(f"{sft_dir}/{split}.jsonl is not in the native format: run build-sft with --format native")
    dataset = SftDataset(samples, processor)
    keep = [i for i, item in enumerate(dataset.items) if item.length <= params.train.max_length]
    skipped = len(dataset.items) - len(keep)
    dataset.items = [dataset.items[i] for i in keep]
    dataset.samples = [dataset.samples[i] for i in keep]
    return dataset, skipped


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- train -----------------------------------------------------------------------------


def fit_phase(params: Params, phase_number: int, sft_dir: Path, resume: bool = False, tracking=None) -> dict:
    """Run one phase and return its metrics (see the module doc)."""
    phase = params.train.phase(phase_number)
    out = phase_dir(params, phase_number)
    rank, world = init_distributed()
    if not phase.enabled:
        start = starting_point(params, phase_number)
        if rank == 0:
            write_json_atomic(out / "phase.json", {"phase": phase_number, "enabled": False, "starts_from": str(start)})
        return {"phase": phase_number, "enabled": False}

    _seed_everything(params.train.seed)
    model, processor, family, start = build_model(params, phase_number, phase)
    table = trainable_table(model, family)
    if rank == 0:
        _print_table(table, phase_number)

    train_set, skipped_train = load_split(params, sft_dir, "train", processor)
    val_set, skipped_val = load_split(params, sft_dir, "val", processor)
    summary = sft_dir / "sft_summary.json"
    classes = json.loads(summary.read_text(encoding="utf-8"))["classes"] if summary.exists() else []
    templates, knowledge = load_templates(params.sft), load_knowledge(params.sft)
    prompt = prompt_config(params.sft, templates, knowledge, classes, train_set.samples)
    collate = Collator(processor)
    lengths = [item.length for item in train_set.items]
    micro_per_epoch = len(batches(lengths, params.train.batch_size, 0, 0, False)) // world
    steps_per_epoch = max(1, micro_per_epoch // params.train.grad_accum)
    total_steps = phase.max_steps or math.ceil(phase.epochs * steps_per_epoch)

    groups = param_groups(model, family, phase)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in groups],
        weight_decay=params.train.weight_decay,
    )
    factor = lr_lambda(total_steps, params.train.warmup_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(params, world),
    )
    state = TrainerState()
    checkpoints = out / CHECKPOINTS
    if resume:
        state = _load_checkpoint(engine, checkpoints, rank)
    elif rank == 0 and out.exists():
        shutil.rmtree(out)
    dist.barrier()

    logger = tracking.phase_logger(params, phase_number, table) if (tracking and rank == 0) else None

    def evaluate_and_keep_best(step: int) -> None:
        with_roi_f1 = params.train.metric_for_best_model == "roi_f1"
        metrics = validation_metrics(engine, processor, val_set, classes, params.train.batch_size, with_roi_f1)
        value = metrics[params.train.metric_for_best_model]
        best = state.best_metric
        if best is None or (value > best if params.train.greater_is_better else value < best):
            state.best_metric, state.best_step = value, step
            info = _phase_info(params, phase_number, start, family, step)
            save_best(engine, out / BEST, processor, family, info, rank, prompt)
        state.history.append({"step": step, **metrics})
        _log({"step": step, **metrics}, logger, rank)

    efficiency_sum = efficiency_n = 0
    tokens_real = tokens_padded = 0
    running_loss, running_n = 0.0, 0
    started = time.perf_counter()
    epoch = state.epoch
    while state.global_step < total_steps:
        order = batches(lengths, params.train.batch_size, params.train.seed, epoch, params.train.group_by_length)
        mine = order[rank::world][:micro_per_epoch]
        for micro, indices in enumerate(mine):
            if epoch == state.epoch and micro < state.micro_in_epoch:
                continue  # done before the checkpoint we resumed from
            batch = collate([train_set[i] for i in indices])
            efficiency_sum += token_efficiency(batch["attention_mask"])
            efficiency_n += 1
            tokens_real += int(batch["attention_mask"].sum())
            tokens_padded += batch["attention_mask"].numel()
            loss = engine(**to_device(batch, engine)).loss
            boundary = engine.is_gradient_accumulation_boundary()  # asked after step(), it is the next micro's
            engine.backward(loss)
            engine.step()
            running_loss += loss.item()
            running_n += 1
            state.epoch, state.micro_in_epoch = epoch, micro + 1
            if not boundary:
                continue
            state.global_step += 1
            step = state.global_step
            if step % params.train.logging_steps == 0 or step == total_steps:
                record = {
                    "step": step,
                    "loss": mean_across_ranks(running_loss / running_n),
                    "token_efficiency": mean_across_ranks(efficiency_sum / efficiency_n),
                    **{f"lr_{g['name']}": lr for g, lr in zip(groups, scheduler.get_last_lr(), strict=True)},
                }
                running_loss, running_n = 0.0, 0
                _log(record, logger, rank)
            if step % params.train.eval_steps == 0 or step == total_steps:
                evaluate_and_keep_best(step)
            if step % params.train.save_steps == 0 and step < total_steps:
                _save_checkpoint(engine, checkpoints, state, params.train.save_total_limit, rank)
            if step >= total_steps:
                break
        else:
            epoch += 1
            state.epoch, state.micro_in_epoch = epoch, 0
            continue
        break

    metrics = {
        "phase": phase_number,
        "enabled": True,
        "world_size": world,
        "weights_digest_per_rank": _digests_across_ranks(engine),
        "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "best_step": state.best_step,
        params.train.metric_for_best_model: state.best_metric,
        "token_efficiency": round(mean_across_ranks(efficiency_sum / max(1, efficiency_n)), 4),
        "tokens": {"real": tokens_real * world, "padded": tokens_padded * world},
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_samples": len(train_set),
        "val_samples": len(val_set),
        "skipped_too_long": {"train": skipped_train, "val": skipped_val},
        "history": state.history,
    }
    if logger:
        metrics["mlflow_run_id"] = logger.run.info.run_id
    if rank == 0:
        write_json_atomic(out / "metrics.json", metrics)
        write_json_atomic(out / "trainable.json", table)
        write_json_atomic(out / "params.json", params_to_dict(params))
        write_json_atomic(out / "phase.json", _phase_info(params, phase_number, start, family))
        if logger:
            logger.finish(metrics, out)
    dist.barrier()
    return metrics


def _gathered(engine, parameters: list[torch.nn.Parameter]):
    """Full tensors inside the block: ZeRO-3 partitions parameters across ranks."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(parameters)
    return contextlib.nullcontext()


def _digests_across_ranks(engine) -> list[str]:
    """Each rank's digest of its trainable weights (all equal when data parallelism is sound)."""
    model = engine.module
    trainable = [(canonical(n), p) for n, p in model.named_parameters() if p.requires_grad]
    with _gathered(engine, [p for _, p in trainable]):
        mine = weights_digest(trainable)
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def save_best(engine, directory: Path, processor, family, info: dict, rank: int, prompt: dict) -> None:
    """Write best/ from the engine's current weights (gathered when ZeRO-3 partitions them)."""
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _gathered(engine, trainable):
        if rank == 0:
            state, modules = trained_tensors(model, family)
    if rank == 0:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(tmp, model, state, modules, family, processor, info, prompt)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    dist.barrier()


def _phase_info(params: Params, phase_number: int, start: Path | None, family, step: int | None = None) -> dict:
    return {
        "phase": phase_number,
        "enabled": True,
        "family": family.name,
        "base": params.model.name_or_path,
        "starts_from": str(start) if start else None,
        "step": step,
        "min_pixels": params.model.min_pixels,
        "max_pixels": params.model.max_pixels,
        "phase_params": params.train.phase(phase_number).model_dump(),
        "lora": params.train.lora.model_dump(),
    }


# --- checkpoints -----------------------------------------------------------------------


def _save_checkpoint(engine, root: Path, state: TrainerState, limit: int, rank: int) -> None:
    tag = f"step-{state.global_step:06d}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    # RNG first: DeepSpeed writes `latest` last, so a kill mid-save resumes from the previous tag
    torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": asdict(state)})
    dist.barrier()
    if rank == 0:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-limit]:
            shutil.rmtree(old)


def _load_checkpoint(engine, root: Path, rank: int) -> TrainerState:
    if not (root / "latest").exists():
        raise StepFailure(f"--resume: no checkpoint in {root}")
    path, client = engine.load_checkpoint(str(root))
    if path is None:
        raise StepFailure(f"--resume: could not load the checkpoint in {root}")
    tag = (root / "latest").read_text().strip()
    _set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False))
    state = TrainerState(**client["trainer_state"])
    if rank == 0:
        console.print(f"resumed from {root / tag} at step {state.global_step}")
    return state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- reporting -------------------------------------------------------------------------


def _log(record: dict, logger, rank: int) -> None:
    if rank != 0:
        return
    console.print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if logger:
        logger.log_metrics(record)


def _print_table(table: list[dict], phase_number: int) -> None:
    view = Table("module group", "kind", "trainable", "total", title=f"phase {phase_number}: trainable parameters")
    for row in table:
        view.add_row(row["group"], row["kind"], f"{row['trainable']:,}", f"{row['total']:,}")
    console.print(view)
