"""The deterministic training stream: batch `step` of rank `r` is a pure function of (seed, step, r).

Each batch position gets a tile and an augmentation seed from a generator seeded by (seed, rank,
step, position): the tile comes from a per-epoch permutation of the rank's shard (tile indices
``i % world_size == rank``), or from a rare-class sampler restricted to that shard. Loader worker
processes only execute that plan, so the batches do not depend on `num_workers`, and a stream
started at step k yields exactly the batches k, k+1, ... of a stream started at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lpcgma.data.sampling import MaskDataset, RareClassSampler, class_histograms
from lpcgma.data.transforms import TextureAugment, TrainTransform

if TYPE_CHECKING:
    from lpcgma.config import DataConfig

Sample = dict[str, Any]
Batch = dict[str, torch.Tensor]
Transform = Callable[[Sample, int], Sample]
Plan = list[tuple[int, int]]  # per batch position: (tile index, augmentation seed)

_PERMUTATION, _POSITION = 0, 1  # tags that keep the two kinds of seed sequences apart


def collate(samples: list[Sample]) -> Batch:
    """Stack transformed samples into ``{"image": [B, 3, h, w], "mask": [B, h, w]}``."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
    }


class _PlannedSamples(Dataset[Sample]):
    """Map-style view whose index is a (tile, augmentation seed) pair: returns the transformed tile."""

    def __init__(self, dataset: MaskDataset, transform: Transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Sample:  # type: ignore[override]
        tile, seed = item
        return self.transform(self.dataset[tile], seed)


class _StepPlans(Sampler[Plan]):
    """Yields the plan of steps start, start + 1, ... forever (a DataLoader batch_sampler)."""

    def __init__(self, stream: TrainStream, start_step: int) -> None:
        self.stream, self.start_step = stream, start_step

    def __iter__(self) -> Iterator[Plan]:
        step = self.start_step
        while True:
            yield self.stream.plan(step)
            step += 1


class TrainStream:
    """Infinite, resumable, shard-aware batches of transformed samples for one domain.

    `sampler` (or `rcs_temperature`, which builds one from the dataset's class histograms over this
    rank's shard) switches tile choice to rare-class sampling. Give streams that must differ (source
    and target) different seeds.
    """

    def __init__(
        self,
        dataset: MaskDataset,
        transform: Transform,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        sampler: RareClassSampler | None = None,
        rcs_temperature: float | None = None,
    ) -> None:
        if batch_size < 1 or seed < 0 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(
                "TrainStream: need batch_size >= 1, seed >= 0, 0 <= rank < world_size, num_workers >= 0; "
                f"got {batch_size=}, {seed=}, {rank=}, {world_size=}, {num_workers=}"
            )
        self.shard = np.arange(rank, len(dataset), world_size)
        if len(self.shard) == 0:
            raise ValueError(f"rank {rank} of {world_size} has no tiles: the dataset holds only {len(dataset)}")
        if sampler is None and rcs_temperature is not None:
            sampler = RareClassSampler.from_histograms(class_histograms(dataset), rcs_temperature, indices=self.shard)
        if sampler is not None and not all(np.all(t % world_size == rank) for t in sampler.tiles):
            raise ValueError(f"the sampler draws tiles outside rank {rank}'s shard (i % {world_size} == {rank})")
        self.dataset, self.transform, self.sampler = dataset, transform, sampler
        self.batch_size, self.seed, self.rank, self.num_workers = batch_size, seed, rank, num_workers
        self._permutation: tuple[int, np.ndarray] = (-1, self.shard)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._permutation[0] != epoch:
            rng = np.random.default_rng([_PERMUTATION, self.seed, self.rank, epoch])
            self._permutation = (epoch, rng.permutation(self.shard))
        return self._permutation[1]

    def plan(self, step: int) -> Plan:
        """(tile index, augmentation seed) for each position of batch `step`."""
        out = []
        for position in range(self.batch_size):
            rng = np.random.default_rng([_POSITION, self.seed, self.rank, step, position])
            aug_seed = int(rng.integers(2**31))
            if self.sampler is not None:
                tile = self.sampler.sample(rng)
            else:
                epoch, i = divmod(step * self.batch_size + position, len(self.shard))
                tile = int(self._epoch_order(epoch)[i])
            out.append((tile, aug_seed))
        return out

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Collated batches for steps start_step, start_step + 1, ... (never ends)."""
        items = _PlannedSamples(self.dataset, self.transform)
        if self.num_workers == 0:
            step = start_step
            while True:
                yield collate([items[item] for item in self.plan(step)])
                step += 1
        loader = DataLoader(
            items,
            batch_sampler=_StepPlans(self, start_step),
            num_workers=self.num_workers,
            collate_fn=collate,
        )
        yield from loader


def augmented_stream(
    dataset: MaskDataset,
    data_cfg: DataConfig,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    rcs_temperature: float | None = None,
    source: bool = False,
) -> TrainStream:
    """`dataset`'s training-augmented batches as `data_cfg` describes them (rescale, crop, flips,
    photometric jitter, normalisation by `mean`/`std`), `data.batch_size` each, this rank's shard.
    `source`: the labelled source stream, which also gets the ``data.source_*`` texture augmentation."""
    d = data_cfg
    texture = TextureAugment()
    if source:
        texture = TextureAugment(d.source_blur_prob, d.source_noise_prob, d.source_noise_std)
    return TrainStream(
        dataset,
        TrainTransform(d.crop_size, d.scale_range, d.hflip, d.photometric, mean, std, texture),
        batch_size=d.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        rcs_temperature=rcs_temperature,
    )
