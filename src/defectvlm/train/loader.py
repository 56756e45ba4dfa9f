"""The training data path: a `torch.utils.data.DataLoader` whose worker processes decode, crop
and process the images of the next micro-batches while the current one trains.

The order is `batches` (shuffled by train.seed and the epoch, length-grouped): each rank takes
every world-th batch of it, cut to the same count on every rank (ranks that ran different
numbers of steps would wait on each other forever), from the micro-batch where a resumed run
stopped. The training process draws this order; the workers only turn index lists into tensors
(`Collator`), so their number never changes a batch (train.num_workers: 0 collates in the
training process itself).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from defectvlm.config import TrainParams
from defectvlm.errors import StepFailure
from defectvlm.train.data import Collator, SftDataset, batches

PREFETCH = 2  # micro-batches each worker prepares ahead


class RankBatches(Sampler[list[int]]):
    """One rank's micro-batches (lists of sample indices), epoch after epoch without end, from
    micro-batch `start` of `epoch` on: one stream, so the workers prefetch across epochs."""

    def __init__(self, lengths: list[int], train: TrainParams, rank: int, world: int):
        super().__init__()
        self.lengths, self.rank, self.world = lengths, rank, world
        self.batch_size, self.seed, self.group_by_length = train.batch_size, train.seed, train.group_by_length
        self.per_rank = math.ceil(len(lengths) / train.batch_size) // world  # micro-batches per epoch
        if self.per_rank == 0:
            raise StepFailure(
                f"the train split has {len(lengths)} usable samples: fewer than one batch per rank "
                f"(train.batch_size {train.batch_size} x {world} ranks)"
            )
        self.epoch = self.start = 0

    def start_at(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def share(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`: every world-th of the seeded order, as many on every rank."""
        order = batches(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
        return order[self.rank :: self.world][: self.per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.start
        while True:
            yield from self.share(epoch)[start:]
            epoch, start = epoch + 1, 0


def train_loader(dataset: SftDataset, processor, train: TrainParams, rank: int, world: int) -> DataLoader:
    """Collated micro-batches of this rank; `stream` picks where they start."""
    workers = train.num_workers
    return DataLoader(
        dataset,
        batch_sampler=RankBatches([item.length for item in dataset.items], train, rank, world),
        collate_fn=Collator(processor),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=PREFETCH if workers else None,
        # the loader seeds its workers from here, not from torch's global RNG (dropout's)
        generator=torch.Generator().manual_seed(train.seed),
    )


def stream(loader: DataLoader, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's micro-batches from the start-th of `epoch` on (those before were trained), endless."""
    loader.batch_sampler.start_at(epoch, start)
    return iter(loader)


@dataclass
class WaitClock:
    """Seconds the training process spent waiting for its next batch."""

    seconds: float = 0.0


def timed(items: Iterable, clock: WaitClock) -> Iterator:
    """`items`, adding the time each took to arrive to `clock`."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        clock.seconds += time.perf_counter() - start
        yield item
