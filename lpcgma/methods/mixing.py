"""ClassMix (DACS): paste half of the classes of a source image onto a target image."""

from __future__ import annotations

import torch
from torch import Tensor

from lpcgma.losses.segmentation import IGNORE_INDEX


def classmix_masks(source_labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Binary paste masks [B,H,W]: for each image, half (rounded up) of its present classes.

    Fixed-size tensor ops only (no `unique`, no data-dependent shapes), so nothing waits on the GPU:
    every class id 0–254 gets a random key (drawn on `generator`, CPU), the present classes of an
    image are ranked by key, and the first ⌈n/2⌉ are pasted.
    """
    b = source_labels.shape[0]
    dev = source_labels.device
    labels = source_labels.reshape(b, -1).long()
    ids = IGNORE_INDEX + 1  # class ids are < 255; 255 is "ignore" and never pasted
    present = torch.zeros(b, ids, dtype=torch.bool, device=dev).scatter_(1, labels.clamp(0, ids - 1), True)
    present[:, IGNORE_INDEX] = False
    keys = torch.rand(b, ids, generator=generator).to(dev)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))  # absent classes rank last
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = present & (rank < (present.sum(dim=1, keepdim=True) + 1) // 2)
    return chosen.gather(1, labels.clamp(0, ids - 1)).reshape(source_labels.shape)


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """Where mask: source, else target. mask [B,H,W]; tensors [B,H,W] or [B,C,H,W]."""
    m = mask if source.dim() == mask.dim() else mask[:, None]
    return torch.where(m, source, target)
