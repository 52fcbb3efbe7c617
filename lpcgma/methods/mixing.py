"""ClassMix (DACS): paste half of the classes of a source image onto a target image."""

from __future__ import annotations

import torch
from torch import Tensor

from lpcgma.losses.segmentation import IGNORE_INDEX


def classmix_masks(source_labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Binary paste masks [B,H,W]: for each image, half (rounded up) of its present classes."""
    masks = torch.zeros_like(source_labels, dtype=torch.bool)
    for b in range(source_labels.shape[0]):  # B is 1–4: a loop over images, not pixels
        classes = torch.unique(source_labels[b])
        classes = classes[classes != IGNORE_INDEX]
        if classes.numel() == 0:
            continue
        perm = torch.randperm(classes.numel(), generator=generator, device="cpu").to(classes.device)
        chosen = classes[perm[: (classes.numel() + 1) // 2]]
        masks[b] = torch.isin(source_labels[b], chosen)
    return masks


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """Where mask: source, else target. mask [B,H,W]; tensors [B,H,W] or [B,C,H,W]."""
    m = mask if source.dim() == mask.dim() else mask[:, None]
    return torch.where(m, source, target)
