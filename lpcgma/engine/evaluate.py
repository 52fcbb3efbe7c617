"""Evaluation: confusion-matrix metrics and sliding-window inference over whole tiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lpcgma.losses.segmentation import IGNORE_INDEX


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction; ignore index never counted."""
    valid = (target != IGNORE_INDEX) & (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: Tensor, class_names: Sequence[str], prefix: str = "") -> dict[str, float]:
    """mIoU, per-class IoU, OA and mF1. Classes absent from both truth and prediction are left
    out of the means (their IoU is reported as NaN-free 0 only if predicted)."""
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(present, 2 * tp / (gt + pr).clamp_min(1), torch.zeros_like(tp))
    n_present = present.sum().clamp_min(1)
    out = {
        f"{prefix}miou": float(iou[present].sum() / n_present),
        f"{prefix}oa": float(tp.sum() / cm.sum().clamp_min(1)),
        f"{prefix}mf1": float(f1[present].sum() / n_present),
    }
    for name, v, p in zip(class_names, iou.tolist(), present.tolist(), strict=True):
        if p:
            out[f"{prefix}iou/{name}"] = v
    return out


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def rescale_image(image: Tensor, scale: float) -> Tensor:
    """A [3,H,W] image resized by `scale` (bilinear, antialiased when shrinking); unchanged at 1."""
    if scale == 1.0:
        return image
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


@torch.no_grad()
def sliding_window_scores(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    window: int,
    stride: int,
    batch: int = 4,
    scale: float = 1.0,
) -> Tensor:
    """Class scores [C,H,W] of a whole tile [3,H,W]: overlapping windows, averaged softmax scores.

    `predict` maps [N,3,h,w] → logits [N,C,h,w] at input size. Tiles smaller than the window are
    padded (zeros in normalised space) and cropped back. With `scale` ≠ 1 the tile is first resized
    by `scale` (the test scale, e.g. the middle of a training `scale_range` below 1) and the scores
    are resized back to H×W (bilinear), as mmsegmentation's test-time ``Resize`` does.
    """
    _, h, w = image.shape
    if scale != 1.0:
        scores = sliding_window_scores(predict, rescale_image(image, scale), num_classes, window, stride, batch)
        return F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(image, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else image
    acc = image.new_zeros((num_classes, ph, pw))
    count = image.new_zeros((1, ph, pw))
    boxes = [(y, x) for y in _window_starts(ph, window, stride) for x in _window_starts(pw, window, stride)]
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        crops = torch.stack([padded[:, y : y + window, x : x + window] for y, x in chunk])
        probs = predict(crops).float().softmax(dim=1)
        for (y, x), p in zip(chunk, probs, strict=True):
            acc[:, y : y + window, x : x + window] += p
            count[:, y : y + window, x : x + window] += 1
    return (acc / count)[:, :h, :w]
