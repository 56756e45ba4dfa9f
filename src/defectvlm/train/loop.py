"""`defectvlm train --phase N`: the training recipe, top to bottom.

    recipe = Recipe(params, phase, sft_dir, tracking)
    recipe.setup()                       # model + the phase's LoRA, param groups, data, DeepSpeed
    recipe.resume() or recipe.start()    # the last checkpoint, or an empty phase folder
    recipe.train()                       # epochs of micro-batches: steps, logs, validate(), checkpoints
    recipe.save()                        # metrics.json, trainable.json, params.json, phase.json

`validate()` (evaluation loss and the scoring pass on val) runs every train.eval_steps and keeps
best/ when the metric improves. The parts setup() builds are in `train.build`, what is saved
in `train.checkpoints`, the data path (a DataLoader with worker processes) in `train.loader`.

One process by default; `torchrun --nproc_per_node N -m defectvlm train ...` runs N data-
parallel ranks (gloo on CPU, NCCL on GPU). `--resume` continues from the last checkpoint
exactly: weights, optimizer, scheduler, RNG states and the position in the data order.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from defectvlm.config import Params, params_to_dict
from defectvlm.io import write_json_atomic
from defectvlm.train.build import BEST, PhaseData, build_model, deepspeed_config, phase_dir, phase_info, starting_point
from defectvlm.train.checkpoints import (
    CHECKPOINTS,
    TrainerState,
    digests_across_ranks,
    load_checkpoint,
    save_best,
    save_checkpoint,
    seed_everything,
)
from defectvlm.train.data import token_efficiency
from defectvlm.train.distributed import init_distributed, mean_across_ranks
from defectvlm.train.loader import WaitClock, stream, timed, train_loader
from defectvlm.train.phases import param_groups, trainable_table
from defectvlm.train.validation import to_device, validation_metrics

console = Console(stderr=True, soft_wrap=True)


def fit_phase(params: Params, phase_number: int, sft_dir: Path, resume: bool = False, tracking=None) -> dict:
    """Run one phase and return its metrics (see the module doc)."""
    rank, _ = init_distributed()
    if not params.train.phase(phase_number).enabled:
        if rank == 0:
            start = starting_point(params, phase_number)
            info = {"phase": phase_number, "enabled": False, "starts_from": str(start)}
            write_json_atomic(phase_dir(params, phase_number) / "phase.json", info)
        return {"phase": phase_number, "enabled": False}
    recipe = Recipe(params, phase_number, Path(sft_dir), tracking)
    recipe.setup()
    if resume:
        recipe.resume()
    else:
        recipe.start()
    recipe.train()
    return recipe.save()


@dataclass
class Running:
    """Counters of this process since the run (or the resume) started; the loss since the last log."""

    loss_sum: float = 0.0
    loss_n: int = 0
    efficiency_sum: float = 0.0
    efficiency_n: int = 0
    tokens_real: int = 0
    tokens_padded: int = 0
    data_wait: WaitClock = field(default_factory=WaitClock)  # seconds waiting for the next batch

    def count_batch(self, attention_mask: torch.Tensor) -> None:
        self.efficiency_sum += token_efficiency(attention_mask)
        self.efficiency_n += 1
        self.tokens_real += int(attention_mask.sum())
        self.tokens_padded += attention_mask.numel()


class Recipe:
    """One phase of training; the module doc gives the order of its public methods."""

    def __init__(self, params: Params, phase_number: int, sft_dir: Path, tracking=None):
        self.params, self.number, self.sft_dir, self.tracking = params, phase_number, sft_dir, tracking
        self.phase = params.train.phase(phase_number)
        self.out = phase_dir(params, phase_number)
        self.rank, self.world = init_distributed()
        self.state = TrainerState()
        self.running = Running()
        self.logger = None
        self.train_seconds = 0.0

    # --- setup -------------------------------------------------------------------------

    def setup(self) -> None:
        """The model in the phase's trainable state, the data and its loader, the DeepSpeed engine."""
        train = self.params.train
        seed_everything(train.seed)
        self.model, self.processor, self.family, self.start_from = build_model(self.params, self.number, self.phase)
        self.table = trainable_table(self.model, self.family)
        if self.rank == 0:
            print_table(self.table, self.number)
        self.data = PhaseData.load(self.params, self.sft_dir, self.processor)
        self.loader = train_loader(self.data.train, self.processor, train, self.rank, self.world)
        self.steps_per_epoch = max(1, self.loader.batch_sampler.per_rank // train.grad_accum)
        self.total_steps = self.phase.max_steps or math.ceil(self.phase.epochs * self.steps_per_epoch)
        self.groups = param_groups(self.model, self.family, self.phase)
        optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in self.groups],
            weight_decay=train.weight_decay,
        )
        schedule = lr_lambda(self.total_steps, train.warmup_ratio)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
            config=deepspeed_config(self.params, self.world),
        )

    def start(self) -> None:
        """A fresh run: the phase's folder emptied."""
        if self.rank == 0 and self.out.exists():
            shutil.rmtree(self.out)
        dist.barrier()

    def resume(self) -> None:
        """Weights, optimizer, scheduler, RNGs and the data position of the last checkpoint."""
        self.state, tag = load_checkpoint(self.engine, self.out / CHECKPOINTS, self.rank)
        if self.rank == 0:
            console.print(f"resumed from {tag} at step {self.state.global_step}")
        dist.barrier()

    # --- train -------------------------------------------------------------------------

    def train(self) -> None:
        """Micro-batches, epoch after epoch, until the phase's number of optimizer steps."""
        if self.tracking and self.rank == 0:
            self.logger = self.tracking.phase_logger(self.params, self.number, self.table)
        started = time.perf_counter()
        batches = timed(stream(self.loader, self.state.epoch, self.state.micro_in_epoch), self.running.data_wait)
        while self.state.global_step < self.total_steps:
            stepped = self.micro_step(next(batches))
            self.count_micro_batch()
            if stepped:
                self.after_step()
        batches.close()  # the loader's workers stop here
        self.train_seconds = time.perf_counter() - started

    def count_micro_batch(self) -> None:
        """The position in the data order that a checkpoint saves: (epoch, micro-batches done in it)."""
        state = self.state
        if state.micro_in_epoch == self.loader.batch_sampler.per_rank:
            state.epoch, state.micro_in_epoch = state.epoch + 1, 0
        state.micro_in_epoch += 1

    def micro_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward; True when this micro-batch completed an optimizer step."""
        self.running.count_batch(batch["attention_mask"])
        loss = self.engine(**to_device(batch, self.engine)).loss
        boundary = self.engine.is_gradient_accumulation_boundary()  # asked after step(), it is the next micro's
        self.engine.backward(loss)
        self.engine.step()
        self.running.loss_sum += loss.item()
        self.running.loss_n += 1
        self.state.global_step += int(boundary)
        return boundary

    def after_step(self) -> None:
        """Log, validate and checkpoint on their schedules (the last step logs and validates)."""
        train, step = self.params.train, self.state.global_step
        last = step >= self.total_steps
        if step % train.logging_steps == 0 or last:
            self.log_training(step)
        if step % train.eval_steps == 0 or last:
            self.validate(step)
        if step % train.save_steps == 0 and not last:
            save_checkpoint(self.engine, self.out / CHECKPOINTS, self.state, train.save_total_limit, self.rank)

    def log_training(self, step: int) -> None:
        running = self.running
        record = {
            "step": step,
            "loss": mean_across_ranks(running.loss_sum / running.loss_n),
            "token_efficiency": mean_across_ranks(running.efficiency_sum / running.efficiency_n),
            **{f"lr_{g['name']}": lr for g, lr in zip(self.groups, self.scheduler.get_last_lr(), strict=True)},
        }
        running.loss_sum, running.loss_n = 0.0, 0
        self.log(record)

    # --- validate ----------------------------------------------------------------------

    def validate(self, step: int) -> dict[str, float]:
        """Eval loss (and the scoring pass's metrics) on val; best/ is rewritten when the metric improves."""
        train = self.params.train
        with_scoring = train.metric_for_best_model != "eval_loss"
        metrics = validation_metrics(
            self.engine, self.processor, self.data.val, self.data.classes, train.batch_size, with_scoring
        )
        value, best = metrics[train.metric_for_best_model], self.state.best_metric
        if best is None or (value > best if train.greater_is_better else value < best):
            self.state.best_metric, self.state.best_step = value, step
            info = phase_info(self.params, self.number, self.start_from, self.family, step)
            save_best(self.engine, self.out / BEST, self.processor, self.family, info, self.rank, self.data.prompt)
        self.state.history.append({"step": step, **metrics})
        self.log({"step": step, **metrics})
        return metrics

    # --- save --------------------------------------------------------------------------

    def save(self) -> dict:
        """The phase's metrics.json, trainable.json, params.json and phase.json; returns the metrics."""
        metrics = self.metrics()
        if self.rank == 0:
            write_json_atomic(self.out / "metrics.json", metrics)
            write_json_atomic(self.out / "trainable.json", self.table)
            write_json_atomic(self.out / "params.json", params_to_dict(self.params))
            info = phase_info(self.params, self.number, self.start_from, self.family)
            write_json_atomic(self.out / "phase.json", info)
            if self.logger:
                self.logger.finish(metrics, self.out)
        dist.barrier()
        return metrics

    def metrics(self) -> dict:
        """What the phase did (every rank takes part: digests and means are gathered)."""
        running, state, train = self.running, self.state, self.params.train
        metrics = {
            "phase": self.number,
            "enabled": True,
            "world_size": self.world,
            "weights_digest_per_rank": digests_across_ranks(self.engine),
            "steps": state.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "best_step": state.best_step,
            train.metric_for_best_model: state.best_metric,
            "token_efficiency": round(mean_across_ranks(running.efficiency_sum / max(1, running.efficiency_n)), 4),
            "tokens": {"real": running.tokens_real * self.world, "padded": running.tokens_padded * self.world},
            "train_seconds": round(self.train_seconds, 2),
            "data_wait_seconds": round(mean_across_ranks(running.data_wait.seconds), 2),
            "train_samples": len(self.data.train),
            "val_samples": len(self.data.val),
            "skipped_too_long": self.data.skipped,
            "history": state.history,
        }
        if self.logger:
            metrics["mlflow_run_id"] = self.logger.run.info.run_id
        return metrics

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        console.print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.logger:
            self.logger.log_metrics(record)


def lr_lambda(total_steps: int, warmup_ratio: float):
    """The learning-rate factor of a step: linear warm-up, then cosine decay to 0."""
    return functools.partial(lr_factor, warmup=max(1, int(total_steps * warmup_ratio)), total_steps=total_steps)


def lr_factor(step: int, warmup: int, total_steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def print_table(table: list[dict], phase_number: int) -> None:
    view = Table("module group", "kind", "trainable", "total", title=f"phase {phase_number}: trainable parameters")
    for row in table:
        view.add_row(row["group"], row["kind"], f"{row['trainable']:,}", f"{row['total']:,}")
    console.print(view)
