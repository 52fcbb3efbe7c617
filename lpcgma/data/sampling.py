"""Rare-class sampling of source tiles (DAFormer's RCS), from per-tile class histograms.

Class frequency f_c is the share of labelled source pixels of class c; a step first draws a class
with P(c) ∝ exp((1 − f_c) / T), then a tile uniformly among those where c covers at least
`min_fraction` of the pixels. The histograms are computed once, in memory, or read from the dataset
when it stores them (`StoredHistograms`: Parquet shards), without decoding masks.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lpcgma.data.classes import IGNORE_INDEX


class MaskDataset(Sized, Protocol):
    def __getitem__(self, index: int) -> dict[str, Any]: ...


@runtime_checkable
class StoredHistograms(Protocol):
    """A dataset that stores its per-tile class histograms (int64 [N, C]) beside the tiles."""

    def tile_class_histograms(self) -> np.ndarray: ...


def tile_histogram(mask: Any, num_classes: int | None = None) -> np.ndarray:
    """Pixel count per class of one mask, int64 [C] (ignore pixels excluded).

    C is `num_classes` (a larger class id raises ValueError), else one more than the largest id found.
    """
    flat = torch.as_tensor(mask).reshape(-1)
    counts = torch.bincount(flat[flat != IGNORE_INDEX], minlength=num_classes or 0).numpy()
    if num_classes and len(counts) > num_classes:
        raise ValueError(f"a mask holds class ids >= num_classes={num_classes}")
    return counts  # type: ignore[no-any-return]


def class_histograms(dataset: MaskDataset, num_classes: int | None = None) -> np.ndarray:
    """Pixel count per tile and class, int64 [N, C] (ignore pixels excluded).

    Without `num_classes`, C is one more than the largest class id found. A `StoredHistograms`
    dataset answers from its stored histograms; any other is read tile by tile.
    """
    if isinstance(dataset, StoredHistograms):
        stored = np.asarray(dataset.tile_class_histograms(), dtype=np.int64)
        present = np.flatnonzero(stored.any(axis=0))
        rows = list(stored[:, : int(present[-1]) + 1 if len(present) else 0])  # up to the largest id found
    else:
        rows = [tile_histogram(dataset[i]["mask"]) for i in range(len(dataset))]
    c = num_classes or max((len(r) for r in rows), default=0)
    if any(len(r) > c for r in rows):
        raise ValueError(f"a mask holds class ids >= num_classes={num_classes}")
    hist = np.zeros((len(rows), c), dtype=np.int64)
    for i, r in enumerate(rows):
        hist[i, : len(r)] = r
    return hist


def class_frequencies(hist: np.ndarray) -> np.ndarray:
    """f_c: each class's share of all labelled pixels, float64 [C]."""
    total = hist.sum()
    return hist.sum(axis=0) / max(int(total), 1)  # type: ignore[no-any-return]


def rcs_class_probs(freq: np.ndarray, temperature: float, present: np.ndarray | None = None) -> np.ndarray:
    """P(c) ∝ exp((1 − f_c) / T) over the classes in `present` (default: f_c > 0); others get 0."""
    if temperature <= 0:
        raise ValueError(f"RCS temperature must be > 0, got {temperature}")
    present = freq > 0 if present is None else present
    if not present.any():
        raise ValueError("RCS needs at least one class with labelled pixels")
    logits = np.where(present, (1 - freq) / temperature, -np.inf)
    p = np.exp(logits - logits[present].max())
    return p / p.sum()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RareClassSampler:
    """Draws tile indices: a class by `probs`, then a tile uniformly from `tiles[class]`."""

    probs: np.ndarray  # [C] class probabilities (0 for classes without candidate tiles)
    tiles: tuple[np.ndarray, ...]  # per class: indices of the candidate tiles

    @classmethod
    def from_histograms(
        cls,
        hist: np.ndarray,
        temperature: float,
        min_fraction: float = 0.001,
        indices: np.ndarray | None = None,
    ) -> RareClassSampler:
        """Sampler over the tiles `indices` (default all) of the histograms [N, C].

        Frequencies come from all tiles; a tile is a candidate for class c when c covers at least
        `min_fraction` of its pixels (and at least one pixel).
        """
        freq = class_frequencies(hist)
        indices = np.arange(len(hist)) if indices is None else np.asarray(indices)
        sub = hist[indices]
        need = np.maximum(1, min_fraction * sub.sum(axis=1, keepdims=True))
        tiles = tuple(indices[sub[:, c] >= need[:, 0]] for c in range(hist.shape[1]))
        present = np.array([len(t) > 0 for t in tiles])
        return cls(rcs_class_probs(freq, temperature, present), tiles)

    @classmethod
    def from_dataset(cls, dataset: MaskDataset, temperature: float, **kwargs: Any) -> RareClassSampler:
        """`from_histograms` of `class_histograms(dataset)`."""
        return cls.from_histograms(class_histograms(dataset), temperature, **kwargs)

    def sample(self, rng: np.random.Generator) -> int:
        """One tile index: a class drawn by `probs`, then one of its candidate tiles uniformly."""
        c = int(rng.choice(len(self.probs), p=self.probs))
        return int(self.tiles[c][rng.integers(len(self.tiles[c]))])
