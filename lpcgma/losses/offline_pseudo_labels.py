"""Pseudo-labels with per-class confidence thresholds: offline (SDCA's final self-training round) and
online (`running_class_thresholds`, self-training's `method.class_thresholds`).

The adapted model predicts every target training pixel once; pixel i gets the class ŷ_i = argmax p_i
and the confidence q_i = max p_i. Class c keeps its pixels with q_i ≥ θ_c, the rest are ignored (255):

    θ_c = min(median{q_i : ŷ_i = c}, cap)      (cap = 0.9 in SDCA)

The median is the released code's (BIT-DA/SDCA ``core/utils/pseudo_label.py``): the element at
0-based index k_c = round(n_c / 2) of the ascending confidences of the n_c pixels predicted as c,
rounded half to even (``np.round``), i.e. the upper median for even n_c. A class that no pixel is
predicted as gets θ_c = +inf: should any pixel of it turn up, it is ignored (never NaN).

The median is found exactly without gathering the pixels: a bisection on the float32 bit pattern of
θ (non-negative floats order like their bits) for the smallest value with at least k_c + 1 values
≤ it, where the counts may be summed over ranks by a `reduce` callable (e.g. an all-reduce). So each
rank can label its own shard of tiles and every rank obtains the thresholds of the whole set.

Online, the same rule runs on each teacher batch and the thresholds are running averages:
θ_c ← m·θ_c + (1 − m)·min(median_c(batch), cap) for the classes predicted in the batch; the others
keep theirs. Started at the cap, a class the teacher is never confident about gets a threshold its
most confident pixels pass (class-balanced self-training, Zou et al. 2018, with CBST's portion at ½).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lpcgma.losses.segmentation import IGNORE_INDEX

Reduce = Callable[[Tensor], Tensor]  # sums an int64 tensor over the holders of the pixels (ranks)

_ONE_BITS = 0x3F800000  # the float32 bit pattern of 1.0: confidences lie in [0, bits(1.0)]
_BISECTION_STEPS = 30  # ceil(log2(_ONE_BITS + 1)): the search interval shrinks to one value


def median_index(count: Tensor) -> Tensor:
    """0-based index round(n/2) (half to even, as ``np.round``) of the median in n sorted values, int64."""
    return torch.round(count.to(torch.float64) * 0.5).to(torch.int64)


def class_median_thresholds(
    confidence: Tensor,
    prediction: Tensor,
    num_classes: int,
    cap: float = 0.9,
    reduce: Reduce | None = None,
) -> Tensor:
    """Per-class thresholds θ_c = min(median confidence of the pixels predicted as c, cap), float32 [C].

    `confidence` (values in [0, 1]) and `prediction` (class ids) have the same shape, any; prediction
    values outside [0, C) (e.g. 255) take no part. Classes without pixels get +inf. With `reduce`
    (summing an int64 tensor over ranks, returning the sum; called 31 times, the same on every rank),
    the medians are those of all ranks' pixels together. Exact; detached; on `confidence`'s device.
    """
    conf = confidence.detach().reshape(-1).to(torch.float32)
    pred = prediction.detach().reshape(-1)
    if conf.shape != pred.shape:
        raise ValueError(
            f"confidence and prediction differ in size: {tuple(confidence.shape)} vs {tuple(prediction.shape)}"
        )
    if conf.numel() and not bool(((conf >= 0) & (conf <= 1)).all()):
        raise ValueError("confidences must lie in [0, 1] (max softmax probabilities); found values outside or NaN")
    total: Reduce = reduce if reduce is not None else (lambda t: t)
    per_class = [conf[pred == c].sort().values for c in range(num_classes)]  # ascending, this holder's pixels
    device = conf.device
    count = total(torch.tensor([len(v) for v in per_class], dtype=torch.int64, device=device)).to(device)
    rank = median_index(count)  # the median is the (rank + 1)-th smallest value of the class
    lo = torch.zeros(num_classes, dtype=torch.int64, device=device)
    hi = torch.full((num_classes,), _ONE_BITS, dtype=torch.int64, device=device)
    for _ in range(_BISECTION_STEPS):  # invariant: the median's bit pattern lies in [lo, hi]
        mid = (lo + hi) // 2
        value = mid.to(torch.int32).view(torch.float32)
        at_most = torch.stack([torch.searchsorted(v, value[c : c + 1], right=True)[0] for c, v in enumerate(per_class)])
        enough = total(at_most.to(torch.int64)).to(device) >= rank + 1
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    median = lo.to(torch.int32).view(torch.float32)
    return torch.where(count > 0, median.clamp(max=cap), torch.full_like(median, math.inf))


def apply_class_thresholds(confidence: Tensor, prediction: Tensor, thresholds: Tensor) -> Tensor:
    """`prediction` where confidence ≥ thresholds[prediction], else 255 (same shape and dtype as
    `prediction`); prediction values outside [0, C) become 255 too."""
    num_classes = thresholds.shape[0]
    valid = (prediction >= 0) & (prediction < num_classes)
    safe = torch.where(valid, prediction, torch.zeros_like(prediction)).long()
    keep = valid & (confidence.to(torch.float32) >= thresholds.to(confidence.device, torch.float32)[safe])
    return torch.where(keep, prediction, torch.full_like(prediction, IGNORE_INDEX))


def offline_pseudo_labels(probs: Tensor, cap: float = 0.9, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Pseudo-labels from class probabilities `probs` [N, C, ...] (softmax over dim 1): the labels
    [N, ...] (int64, 255 = ignored) and the thresholds θ [C] of `class_median_thresholds`."""
    confidence, prediction = probs.detach().float().max(dim=1)
    thresholds = class_median_thresholds(confidence, prediction, probs.shape[1], cap, reduce)
    return apply_class_thresholds(confidence, prediction, thresholds), thresholds


def running_class_thresholds(
    thresholds: Tensor, confidence: Tensor, prediction: Tensor, cap: float, momentum: float
) -> Tensor:
    """One online step of the per-class thresholds [C] (float32): θ_c ← m·θ_c + (1 − m)·θ̂_c for the
    classes predicted in this batch, θ̂ = `class_median_thresholds(confidence, prediction, C, cap)`;
    classes with no pixel in the batch keep θ_c. Detached; a new tensor."""
    batch = class_median_thresholds(confidence, prediction, thresholds.shape[0], cap).to(thresholds.device)
    present = torch.isfinite(batch)  # absent classes (+inf) take the other branch; its inf is discarded
    return torch.where(present, momentum * thresholds + (1 - momentum) * batch, thresholds).to(torch.float32)
