"""Pseudo-label diagnostics: how good the teacher's target pseudo-labels are, measured against the
target masks when a benchmark has them (they never enter a loss).

Counts are accumulated per step on the device (`pseudo_label_counts`, no host sync) and turned into
per-class figures at each evaluation (`pseudo_label_report`):

- ``precision/c`` = |ŷ = c ∧ y = c| / |ŷ = c|, ``recall/c`` = |ŷ = c ∧ y = c| / |y = c| over every
  labelled target pixel (the pseudo-labels the student is trained on, before any weighting);
- ``confident_precision/c``: the same precision over the pixels whose confidence q ≥ δ;
- ``confident_share/c`` = |ŷ = c ∧ q ≥ δ| / |ŷ = c|: the share of pixels labelled c that pass δ;
- ``label_share/c`` = |ŷ = c| / N and ``true_share/c`` = |y = c| / N: the class distribution of the
  pseudo-labels beside the truth's (a class the teacher is abandoning shows here first);
- ``accuracy``, ``confident_accuracy``, ``confident_frac`` and ``miou`` (IoU of ŷ against y).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lpcgma.losses.segmentation import IGNORE_INDEX

PREFIX = "pseudo/"


def pseudo_label_counts(
    pseudo: Tensor, confidence: Tensor, truth: Tensor, threshold: float | Tensor, num_classes: int
) -> Tensor:
    """Counts [2, C, C] (long): [0] every labelled pixel, [1] those with confidence ≥ `threshold` (a
    number, or per pixel [B, H, W]);
    rows = true class, columns = pseudo-label. Inputs are [B, H, W]; ignored truth (255) is skipped."""
    c = num_classes
    valid = (truth != IGNORE_INDEX) & (truth >= 0) & (truth < c)
    confident = (confidence >= threshold) & valid
    cell = truth.clamp(0, c - 1).long() * c + pseudo.long().clamp(0, c - 1)
    # fixed-size bincount over (confident, cell); invalid pixels land in an extra bin that is dropped
    index = torch.where(valid, confident.long() * c * c + cell, torch.full_like(cell, 2 * c * c))
    counts = torch.bincount(index.reshape(-1), minlength=2 * c * c + 1)[: 2 * c * c]
    counts = counts.reshape(2, c, c)
    counts[0] += counts[1]  # [0] is all labelled pixels, [1] the confident ones
    return counts


def pseudo_label_report(counts: Tensor, class_names: Sequence[str]) -> dict[str, float]:
    """The diagnostics of the module docstring from `pseudo_label_counts` sums; {} when no pixel was
    counted. A per-class ratio whose denominator is 0 is left out (not reported as 0)."""
    counts = counts.double().cpu()
    every, confident = counts[0], counts[1]
    total = float(every.sum())
    if total == 0:
        return {}
    tp, labelled, true = every.diag(), every.sum(0), every.sum(1)
    conf_tp, conf_labelled = confident.diag(), confident.sum(0)
    out: dict[str, float] = {
        PREFIX + "accuracy": float(tp.sum()) / total,
        PREFIX + "confident_frac": float(confident.sum()) / total,
    }
    if confident.sum() > 0:
        out[PREFIX + "confident_accuracy"] = float(conf_tp.sum() / confident.sum())
    union = labelled + true - tp
    present = union > 0
    out[PREFIX + "miou"] = float((tp[present] / union[present]).mean())
    for i, name in enumerate(class_names):
        ratios = {
            "precision": (tp[i], labelled[i]),
            "recall": (tp[i], true[i]),
            "confident_precision": (conf_tp[i], conf_labelled[i]),
            "confident_share": (conf_labelled[i], labelled[i]),
        }
        for key, (num, den) in ratios.items():
            if den > 0:
                out[f"{PREFIX}{key}/{name}"] = float(num / den)
        out[f"{PREFIX}label_share/{name}"] = float(labelled[i]) / total
        out[f"{PREFIX}true_share/{name}"] = float(true[i]) / total
    return out
