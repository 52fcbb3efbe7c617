import numpy as np
import pytest
import torch

from lpcgma.config import load_config
from lpcgma.data.sampling import RareClassSampler
from lpcgma.data.stream import TrainStream, augmented_stream
from lpcgma.data.synthetic import SyntheticAerial
from lpcgma.data.transforms import TrainTransform

TRANSFORM = TrainTransform(24, (0.5, 1.5), True, True)


@pytest.fixture(scope="module")
def tiles():
    return SyntheticAerial("rural", "train", 10, 32, seed=0)


def _take(stream, start, n):
    it = stream.batches(start)
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"image", "mask"}
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_batch_format(tiles):
    b = _take(TrainStream(tiles, TRANSFORM, batch_size=3, seed=1), 0, 1)[0]
    assert b["image"].shape == (3, 3, 24, 24) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (3, 24, 24) and b["mask"].dtype == torch.int64


def test_same_batches_with_and_without_workers(tiles):
    serial = _take(TrainStream(tiles, TRANSFORM, batch_size=2, seed=4), 0, 4)
    parallel = _take(TrainStream(tiles, TRANSFORM, batch_size=2, seed=4, num_workers=2), 0, 4)
    _assert_same(serial, parallel)


def test_resume_yields_the_uninterrupted_batches(tiles):
    stream = TrainStream(tiles, TRANSFORM, batch_size=3, seed=2)
    full = _take(stream, 0, 9)
    _assert_same(_take(TrainStream(tiles, TRANSFORM, batch_size=3, seed=2), 6, 3), full[6:])
    _assert_same(_take(stream, 4, 1), full[4:5])


def test_plan_is_a_function_of_seed_step_rank():
    ds = SyntheticAerial("rural", "train", 40, 16)
    a = TrainStream(ds, TRANSFORM, batch_size=4, seed=7)
    b = TrainStream(ds, TRANSFORM, batch_size=4, seed=7)
    assert [b.plan(s) for s in (5, 0, 3)] == [a.plan(s) for s in (5, 0, 3)]  # order of calls irrelevant
    assert a.plan(1) != TrainStream(ds, TRANSFORM, batch_size=4, seed=8).plan(1)
    seeds = [seed for s in range(20) for _, seed in a.plan(s)]
    assert len(set(seeds)) == len(seeds)  # a fresh augmentation seed per (step, position)


def test_ranks_draw_disjoint_shards_covering_each_epoch():
    ds = SyntheticAerial("rural", "train", 23, 16)
    world = 3
    seen = []
    for rank in range(world):
        stream = TrainStream(ds, TRANSFORM, batch_size=2, seed=0, rank=rank, world_size=world)
        shard = set(range(rank, 23, world))
        tiles = [t for s in range(40) for t, _ in stream.plan(s)]
        assert set(tiles) == shard
        n = len(shard)
        for e in range(len(tiles) // n):  # each epoch visits every shard tile once
            assert sorted(tiles[e * n : (e + 1) * n]) == sorted(shard)
        seen.append(set(tiles))
    assert set.union(*seen) == set(range(23)) and sum(len(s) for s in seen) == 23


def test_rare_class_sampling_stream_stays_in_shard(tiles):
    stream = TrainStream(tiles, TRANSFORM, batch_size=2, seed=0, rank=1, world_size=2, rcs_temperature=0.01)
    assert stream.sampler is not None
    assert all(t % 2 == 1 for s in range(30) for t, _ in stream.plan(s))
    outside = RareClassSampler(np.array([1.0]), (np.array([0, 1]),))
    with pytest.raises(ValueError, match="shard"):
        TrainStream(tiles, TRANSFORM, batch_size=2, seed=0, rank=1, world_size=2, sampler=outside)


def test_invalid_arguments(tiles):
    with pytest.raises(ValueError):
        TrainStream(tiles, TRANSFORM, batch_size=2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no tiles"):
        TrainStream(
            SyntheticAerial("rural", "train", 2, 16), TRANSFORM, batch_size=1, seed=0, rank=2, world_size=3
        )


def test_texture_augment_reaches_the_source_stream_only(tiles):
    plain = load_config(None, ["data.crop_size=24", "data.batch_size=2"]).data
    blurred = load_config(None, ["data.crop_size=24", "data.batch_size=2", "data.source_blur_prob=1.0"]).data
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def first(d, source):
        return _take(augmented_stream(tiles, d, mean, std, seed=3, source=source), 0, 1)[0]

    _assert_same([first(plain, True)], [first(blurred, False)])  # a target stream ignores data.source_*
    a, b = first(plain, True), first(blurred, True)
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["image"], b["image"])
