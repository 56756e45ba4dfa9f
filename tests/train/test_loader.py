"""The training data path: ranks get equal shares of the seeded order, a resumed epoch starts at
its micro-batch, and worker processes change nothing but where the images are decoded."""

from itertools import islice

import pytest
import torch

from defectvlm.config import params_from_dict
from defectvlm.errors import StepFailure
from defectvlm.io import read_jsonl
from defectvlm.models.tiny import build_tiny
from defectvlm.train.data import SftDataset, batches
from defectvlm.train.loader import RankBatches, stream, train_loader


def train_params(**train):
    return params_from_dict({"train": train}).train


LENGTHS = [(i * 37) % 101 + 5 for i in range(27)]  # 27 samples of batch 2: 14 batches, 13 full


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_as_many_batches_and_together_they_follow_the_seeded_order(world):
    train = train_params(batch_size=2, seed=7, group_by_length=True)
    per_rank = 14 // world
    shares = [list(islice(RankBatches(LENGTHS, train, rank, world), 2 * per_rank)) for rank in range(world)]
    for epoch in (0, 1):
        order = batches(LENGTHS, 2, 7, epoch, True)
        mine = [share[epoch * per_rank : (epoch + 1) * per_rank] for share in shares]
        dealt = [mine[k % world][k // world] for k in range(world * per_rank)]
        assert dealt == order[: len(dealt)]  # round-robin over the length-grouped, shuffled batches


def test_a_resumed_stream_starts_at_the_first_micro_batch_not_yet_trained():
    train = train_params(batch_size=2, seed=3)
    sampler = RankBatches(LENGTHS, train, rank=1, world=2)
    assert sampler.per_rank == 7
    sampler.start_at(2)
    epochs_2_3 = list(islice(sampler, 14))
    assert epochs_2_3[:7] == sampler.share(2) and epochs_2_3[7:] == sampler.share(3) != sampler.share(2)
    sampler.start_at(2, start=4)
    assert list(islice(sampler, 10)) == epochs_2_3[4:]
    sampler.start_at(2, start=7)  # the checkpoint closed epoch 2
    assert list(islice(sampler, 7)) == epochs_2_3[7:]


def test_fewer_batches_than_ranks_is_refused_with_the_keys_to_change():
    with pytest.raises(StepFailure, match=r"train.batch_size 4 x 3 ranks"):
        RankBatches([10] * 8, train_params(batch_size=4), rank=0, world=3)


@pytest.fixture(scope="module")
def dataset(sft_dir):
    _, processor = build_tiny(3136, 200704)
    return SftDataset(read_jsonl(sft_dir / "train.jsonl")[:12], processor), processor


def collect(loader, n=8, epoch=0, start=0) -> list[dict]:
    """n micro-batches from micro-batch `start` of `epoch` (4 per epoch here: 12 samples of 3)."""
    return list(islice(stream(loader, epoch, start), n))


def test_workers_give_byte_identical_batches_to_the_training_process(dataset):
    items, processor = dataset
    inline = collect(train_loader(items, processor, train_params(batch_size=3, num_workers=0), 0, 1))
    workers = collect(train_loader(items, processor, train_params(batch_size=3, num_workers=2), 0, 1))
    assert len(inline) == len(workers) == 8
    for a, b in zip(inline, workers, strict=True):
        assert a.keys() == b.keys() and "pixel_values" in a
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_resuming_mid_epoch_with_workers_yields_the_rest_of_the_stream(dataset):
    items, processor = dataset
    loader = train_loader(items, processor, train_params(batch_size=3, num_workers=2), 0, 1)
    whole = collect(loader, n=7, epoch=1)
    rest = collect(loader, n=5, epoch=1, start=2)
    for a, b in zip(whole[2:], rest, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_batches_leaves_the_global_rng_alone(dataset, workers):
    """Dropout draws from torch's global RNG: a loader that drew its seeds from it would change
    every dropout mask after it (and a resumed run's, whose RNG is restored before the loader)."""
    items, processor = dataset
    loader = train_loader(items, processor, train_params(batch_size=3, num_workers=workers), 0, 1)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    collect(loader)
    assert torch.equal(torch.random.get_rng_state(), before)
