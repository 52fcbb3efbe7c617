"""LPCGMA's local terms: probability-masked supervised contrast (PMC) and pixel contrast between views (PIX).

Pure functions of tensors. Embeddings `z` are L2-normalised rows [N, D]; labels are class ids
with 255 (or any id outside [0, C)) meaning "ignore". The loss functions never synchronise with
the host (no `.item()`, no boolean indexing) and return 0 *with a graph* when nothing qualifies, so
`loss.backward()` always works and never produces NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpcgma.losses.precision import float32
from lpcgma.losses.segmentation import IGNORE_INDEX

# Finite stand-in for "minus infinity" in masked logits (fp32): keeps every softmax/logsumexp and
# its gradient finite even when a whole row is masked.
_MASKED = -1e9


# ------------------------------------------------------------------------------ anchor sampling
def update_class_freq(freq: Tensor, labels: Tensor, momentum: float) -> Tensor:
    """EMA of class-histogram fractions: ν ← m·ν + (1 − m)·hist(labels)/#valid.

    `freq` [C]; `labels` any shape, ids outside [0, C) (255) ignored. When no label is valid the
    frequencies are returned unchanged. Pure (returns a new tensor).
    """
    c = freq.shape[0]
    flat = labels.reshape(-1)
    valid = (flat >= 0) & (flat < c)
    bins = torch.where(valid, flat, torch.full_like(flat, c))
    counts = torch.zeros(c + 1, dtype=freq.dtype, device=freq.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=freq.dtype))
    total = counts[:c].sum()
    hist = counts[:c] / total.clamp_min(1.0)
    return torch.where(total > 0, momentum * freq + (1.0 - momentum) * hist, freq)


def anchor_keep_probs(class_freq: Tensor, base_rate: float, boost: float) -> Tensor:
    """Per-class anchor keep probability p_c = min(1, r·(ν_ref/ν_c)^α) [C].

    ν_ref is the median frequency of the classes seen so far (ν_c > 0; the lower median for an even
    count). DECISION: classes never seen (ν_c = 0) are the rarest possible and get p_c = 1. The rule
    depends only on frequency ratios, so an EMA started from zeros needs no bias correction.
    """
    freq = class_freq.float()
    seen = freq > 0
    ref = torch.nanmedian(torch.where(seen, freq, torch.full_like(freq, float("nan"))))
    ratio = torch.where(seen, ref / torch.where(seen, freq, torch.ones_like(freq)), torch.ones_like(freq))
    p = (base_rate * ratio.pow(boost)).clamp(max=1.0)
    return torch.where(seen, p, torch.ones_like(p))


def _keep_draws(labels: Tensor, keep_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Bernoulli(p_label) draw per pixel of `labels` [N] (ignore-labelled pixels: never kept)."""
    c = keep_probs.shape[0]
    flat = labels.reshape(-1)
    valid = (flat >= 0) & (flat < c)
    p = torch.where(valid, keep_probs.to(flat.device)[flat.clamp(0, c - 1)], torch.zeros((), device=flat.device))
    u = torch.rand(flat.shape[0], generator=generator, device=flat.device)
    return u < p


def sample_anchors(
    labels: Tensor,
    keep_probs: Tensor,
    max_anchors: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices (sorted LongTensor) of anchors among `labels` [N]: Bernoulli(p_label) keep, then a
    uniformly random cap at `max_anchors`. Ignore-labelled pixels are never kept.

    This is sampling, not a loss: it returns a data-dependent number of indices (one host sync);
    `sample_anchor_slots` draws the same way into a fixed number of slots.
    """
    idx = torch.nonzero(_keep_draws(labels, keep_probs, generator)).squeeze(1)
    if idx.numel() > max_anchors:
        pick = torch.randperm(idx.numel(), generator=generator, device=idx.device)[:max_anchors]
        idx = idx[pick].sort().values
    return idx


def sample_anchor_slots(
    labels: Tensor,
    keep_probs: Tensor,
    max_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """`sample_anchors` with static shapes: indices [S] and a validity mask [S], S = min(max_anchors, N).

    The kept pixels are drawn as `sample_anchors` draws them (Bernoulli(p_label)); each gets a uniform
    random key, the rest key −1, and the S largest keys fill the slots: every kept pixel when at most
    S are kept, otherwise a uniformly random S of them. Slots beyond the kept pixels are invalid. No
    host sync, so a step that uses it can be captured (CUDA graphs, `torch.compile`).
    """
    keep = _keep_draws(labels, keep_probs, generator)
    key = torch.rand(keep.shape[0], generator=generator, device=keep.device)
    top = torch.topk(torch.where(keep, key, torch.full_like(key, -1.0)), min(max_anchors, keep.shape[0]))
    return top.indices, top.values >= 0


# ------------------------------------------------------------------------------------- the losses
@float32
def supervised_infonce(z: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Supervised InfoNCE (L_PMC) over anchors `z` [N, D] (L2-normalised) with `labels` [N]:

    L = −mean_i 1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ),

    P(i) = other anchors of i's class (any domain). Anchors without a positive are left out of the
    mean; ignore-labelled rows take no part at all (neither anchor, positive nor denominator).
    Returns 0 with a graph when no anchor has a positive.
    """
    n = z.shape[0]
    zf = z.float()
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pair_ok = valid[:, None] & valid[None, :] & ~eye
    logits = (zf @ zf.T / tau).masked_fill(~pair_ok, _MASKED)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = pair_ok & (labels[:, None] == labels[None, :])
    n_pos = pos.sum(1)
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    per_anchor = torch.where(has_pos, -mean_pos, torch.zeros_like(mean_pos))
    return per_anchor.sum() / has_pos.sum().clamp_min(1)


def _view_infonce(z_a: Tensor, z_b: Tensor, labels: Tensor, valid: Tensor, tau: float) -> Tensor:
    """One direction of the pixel-view contrast: anchors in view a, keys in view b."""
    logits = z_a @ z_b.T / tau  # [N, N]; diagonal = the positive pairs
    n = z_a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z_a.device)
    neg = valid[:, None] & valid[None, :] & (labels[:, None] != labels[None, :])
    keep = (neg | eye) & valid[:, None]
    masked = logits.masked_fill(~keep, _MASKED)
    loss = torch.logsumexp(masked, dim=1) - logits.diagonal()
    anchor = valid & neg.any(1)
    return torch.where(anchor, loss, torch.zeros_like(loss)).sum() / anchor.sum().clamp_min(1)


@float32
def pixel_view_contrast(z_a: Tensor, z_b: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Pixel contrast between two photometric views (L_PIX), symmetric over the views.

    `z_a`, `z_b` [N, D] are the embeddings of the same N pixel locations in the two views (L2-normed);
    `labels` [N] their (pseudo-)classes. For anchor i in view a the positive is z_b[i] and the
    negatives are the view-b pixels of a different class; same-class pixels at other locations are
    neither. DECISION: ignore-labelled pixels (255) are neither anchors nor negatives — without a
    class no pair involving them can be declared negative. Anchors with no negative contribute
    nothing (their loss is identically 0) and are left out of the mean.
    Returns 0.5·(L(a→b) + L(b→a)); 0 with a graph when no anchor qualifies.
    """
    za, zb = z_a.float(), z_b.float()
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    return 0.5 * (_view_infonce(za, zb, labels, valid, tau) + _view_infonce(zb, za, labels, valid, tau))


__all__ = [
    "anchor_keep_probs",
    "pixel_view_contrast",
    "sample_anchor_slots",
    "sample_anchors",
    "supervised_infonce",
    "update_class_freq",
]
