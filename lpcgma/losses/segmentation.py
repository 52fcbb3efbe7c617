"""Segmentation losses of the self-training base: supervised CE and pseudo-label-weighted CE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Pixel-wise CE of logits [B,C,H,W] vs labels [B,H,W] (255 ignored), optionally weighted [B,H,W].

    Unweighted: the mean over valid pixels. Weighted (DACS): sum(w·ce) / number of valid pixels.
    Returns 0 (with a graph) when no pixel is valid.
    """
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).to(ce.dtype)
    if weight is not None:
        ce = ce * weight
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def pseudo_labels(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher pseudo-labels ŷ and their confidence q = max softmax, both [B,H,W]."""
    probs = teacher_logits.detach().float().softmax(dim=1)
    conf, labels = probs.max(dim=1)
    return labels, conf


def pseudo_label_weight(confidence: Tensor, threshold: float | Tensor, mode: str) -> Tensor:
    """Per-pixel weight of the target CE [B,H,W]; `threshold` δ is a number or a per-pixel tensor
    (per-class thresholds looked up at each pixel's label).

    ``fraction`` (DACS): every pixel of image b weighs the fraction of its pixels with q ≥ δ.
    ``confidence``: each pixel weighs its own q.
    ``threshold`` (FixMatch, CBST): 1 where q ≥ δ, else 0 (only confident pixels are trained on).
    """
    if mode == "fraction":
        frac = (confidence >= threshold).float().mean(dim=(1, 2), keepdim=True)
        return frac.expand_as(confidence)
    if mode == "confidence":
        return confidence
    if mode == "threshold":
        return (confidence >= threshold).float()
    raise ValueError(f"method.pseudo_weighting = {mode!r} is invalid: expected 'fraction', 'confidence' or 'threshold'")


def entropy_map(logits: Tensor) -> Tensor:
    """Normalised Shannon entropy of the softmax per pixel, in [0, 1], shape [B,H,W]."""
    logp = logits.float().log_softmax(dim=1)
    ent = -(logp.exp() * logp).sum(dim=1)
    return ent / math.log(logits.shape[1])


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest downsampling of labels [B,H,W] to feature resolution [B,h,w] (ignore kept)."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
