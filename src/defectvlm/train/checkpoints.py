"""What the recipe saves: checkpoints for `--resume` (DeepSpeed's state, the trainer's state and
every RNG, so that a resumed run continues bit for bit) and best/ (the adapter at the best
validation metric), with ZeRO-3's partitioned weights gathered first.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from defectvlm.errors import StepFailure
from defectvlm.train.artifacts import save_trained, trained_tensors
from defectvlm.train.distributed import weights_digest
from defectvlm.train.phases import canonical

CHECKPOINTS = "checkpoints"


@dataclass
class TrainerState:
    """What --resume needs beyond DeepSpeed's own checkpoint."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this rank already done in `epoch`
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def save_checkpoint(engine, root: Path, state: TrainerState, limit: int, rank: int) -> None:
    """checkpoints/step-NNNNNN (the last `limit` kept) and `latest`, which names it."""
    tag = f"step-{state.global_step:06d}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    # RNG first: DeepSpeed writes `latest` last, so a kill mid-save resumes from the previous tag
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": asdict(state)})
    dist.barrier()
    if rank == 0:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-limit]:
            shutil.rmtree(old)


def load_checkpoint(engine, root: Path, rank: int) -> tuple[TrainerState, Path]:
    """Restore the engine and the RNGs from `latest`; the trainer state and the tag's folder."""
    if not (root / "latest").exists():
        raise StepFailure(f"--resume: no checkpoint in {root}")
    path, client = engine.load_checkpoint(str(root))
    if path is None:
        raise StepFailure(f"--resume: could not load the checkpoint in {root}")
    tag = (root / "latest").read_text().strip()
    set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False))
    return TrainerState(**client["trainer_state"]), root / tag


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def gathered(engine, parameters: list[torch.nn.Parameter]):
    """Full tensors inside the block: ZeRO-3 partitions parameters across ranks."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(parameters)
    return contextlib.nullcontext()


def digests_across_ranks(engine) -> list[str]:
    """Each rank's digest of its trainable weights (all equal when data parallelism is sound)."""
    model = engine.module
    trainable = [(canonical(n), p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered(engine, [p for _, p in trainable]):
        mine = weights_digest(trainable)
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def save_best(engine, directory: Path, processor, family, info: dict, rank: int, prompt: dict) -> None:
    """Write best/ from the engine's current weights (gathered when ZeRO-3 partitions them)."""
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(engine, trainable):
        if rank == 0:
            state, modules = trained_tensors(model, family)
    if rank == 0:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(tmp, model, state, modules, family, processor, info, prompt)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    dist.barrier()
