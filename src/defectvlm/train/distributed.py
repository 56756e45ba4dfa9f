"""The process group, and what the ranks compare: means of values and digests of weights."""

from __future__ import annotations

import hashlib
import os
import socket

import deepspeed
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Rank and world size; a plain `defectvlm train` is a world of one."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:  # launched by torchrun
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:  # a world of one on a free port; MASTER_* stay unset so child processes (torchrun) pick their own
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            deepspeed.init_distributed(
                dist_backend=backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=0,
                world_size=1,
                auto_mpi_discovery=False,
                verbose=False,
            )
    return dist.get_rank(), dist.get_world_size()


def weights_digest(named_tensors) -> str:
    """A digest of trained tensors (name, shape, bytes), equal iff the weights are equal."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def mean_across_ranks(value: float) -> float:
    """The mean of `value` over all ranks (on every rank)."""
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item() / dist.get_world_size())
