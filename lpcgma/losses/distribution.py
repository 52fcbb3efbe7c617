"""SDCA: semantic distribution-aware contrastive adaptation (Li et al., 2021) as pure functions.

Each class c of the source domain is summarised by its pixel count n_c, mean μ_c and diagonal
variance σ²_c (exact cumulative pooled statistics, not an EMA). A pixel feature a with label y is
pulled toward the distribution of its class and pushed from the others by the closed-form bound

    ℓ(a, y) = −aᵀμ_y/τ + log Σ_k exp(aᵀμ_k/τ + aᵀdiag(σ²_k)a / (2τ²))

of the contrastive loss with infinitely many pairs drawn from N(μ_k, diag σ²_k): by the Gaussian
moment-generating function E[exp(aᵀã/τ)] = exp(aᵀμ/τ + aᵀΣa/(2τ²)), and by Jensen
E[log Σ_k exp(aᵀã_k/τ)] ≤ log Σ_k E[exp(aᵀã_k/τ)], so ℓ ≥ E_ã[−aᵀã_y/τ + log Σ_k exp(aᵀã_k/τ)].

Statistics are state of the method (buffers); these functions only compute with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lpcgma.losses.precision import float32
from lpcgma.losses.segmentation import IGNORE_INDEX


@float32
def class_moments(feats: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class count [C], mean [C,D] and population variance (ddof 0) [C,D] of feats [N,D].

    Label 255 is ignored. Absent classes get count 0, mean 0, variance 0. Two-pass (centred)
    variance, accumulated with ``index_add`` (no TF32 matmul, deterministic on CUDA). Detached;
    computed in float32 or the input's wider float dtype.
    """
    dtype = torch.promote_types(feats.dtype, torch.float32)
    x = feats.detach().to(dtype)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    w = valid.to(dtype)
    count = x.new_zeros(num_classes).index_add_(0, safe, w)
    denom = count.clamp_min(1.0)[:, None]
    mean = x.new_zeros(num_classes, x.shape[1]).index_add_(0, safe, x * w[:, None]) / denom
    centred = (x - mean[safe]) * w[:, None]
    var = x.new_zeros(num_classes, x.shape[1]).index_add_(0, safe, centred.square()) / denom
    return count, mean, var


def combine_pooled_stats(
    count_a: Tensor, mean_a: Tensor, var_a: Tensor, count_b: Tensor, mean_b: Tensor, var_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact pooled (n, μ, σ²) of two disjoint sets per class (Chan et al.'s parallel algorithm).

    n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + (n_b/n)·δ,
    σ² = (n_a/n)·σ²_a + (n_b/n)·σ²_b + (n_a·n_b/n²)·δ²   (population variances).
    Classes with n_b = 0 are returned unchanged (bit-exact). The count keeps count_a's dtype.
    """
    n = count_a.to(torch.float64) + count_b.to(torch.float64)
    safe_n = n.clamp_min(1.0)
    wa = (count_a.to(torch.float64) / safe_n).to(mean_a.dtype)[:, None]
    wb = (count_b.to(torch.float64) / safe_n).to(mean_a.dtype)[:, None]
    mean_b = mean_b.to(mean_a.dtype)
    delta = mean_b - mean_a
    mean = mean_a + wb * delta
    var = wa * var_a + wb * var_b.to(var_a.dtype) + wa * wb * delta.square()
    present = (count_b > 0)[:, None]
    new_count = count_a + count_b.to(count_a.dtype)
    return new_count, torch.where(present, mean, mean_a), torch.where(present, var, var_a)


def pooled_stats_update(
    count: Tensor, mean: Tensor, var: Tensor, feats: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold a batch feats [N,D], labels [N] into the cumulative class statistics (count, mean, var).

    Exact: after any sequence of updates from zeros, (count, mean, var) equal the count, mean and
    population variance of all pixels seen so far, per class. Label 255 is ignored; classes absent
    from the batch are unchanged. Keep ``count`` in float64 (or int64) so that it stays exact past
    2²⁴ pixels. Detached: statistics carry no gradient. In DDP, all-gather the batch or combine the
    ranks' ``class_moments`` with ``combine_pooled_stats`` before updating.
    """
    batch = class_moments(feats.to(mean.dtype), labels, mean.shape[0])
    return combine_pooled_stats(count, mean, var, *batch)


def _prepared(feats: Tensor, mean: Tensor, var: Tensor, normalize_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """a = feats/‖feats‖ (float32 or wider) and the detached, optionally row-normalised μ, σ²."""
    dtype = torch.promote_types(feats.dtype, torch.float32)
    a = F.normalize(feats.to(dtype), dim=1)
    mu = mean.detach().to(dtype)
    s2 = var.detach().to(dtype)
    if normalize_stats:
        mu = F.normalize(mu, dim=1)
        s2 = F.normalize(s2, dim=1)
    return a, mu, s2


@float32
def sdca_logits(feats: Tensor, mean: Tensor, var: Tensor, tau: float, normalize_stats: bool = True) -> Tensor:
    """Per-class terms z_k = aᵀμ_k/τ + aᵀdiag(σ²_k)a/(2τ²) [N,C] with a = feats/‖feats‖ [N,D].

    ``normalize_stats`` (released code): μ_k and σ²_k are L2-normalised row-wise first.
    """
    a, mu, s2 = _prepared(feats, mean, var, normalize_stats)
    return a @ mu.T / tau + a.square() @ s2.T / (2.0 * tau * tau)


@float32
def sdca_loss(
    feats: Tensor, labels: Tensor, mean: Tensor, var: Tensor, tau: float = 100.0, normalize_stats: bool = True
) -> Tensor:
    """SDCA bound ℓ = −aᵀμ_y/τ + log Σ_k exp(aᵀμ_k/τ + aᵀdiag(σ²_k)a/(2τ²)), mean over valid pixels.

    feats [N,D] are L2-normalised inside (a = f/‖f‖, as in the released code; already-normalised
    embeddings are unchanged), labels [N] (255 ignored), class statistics mean/var [C,D] (detached
    inside). τ = 100 is the released code's default. ``normalize_stats=True`` L2-normalises μ_k and
    σ²_k row-wise first (released code); False uses them as given (the paper's formula).
    Returns 0 with a graph to feats when no pixel is valid. No host synchronisation.
    """
    a, mu, s2 = _prepared(feats, mean, var, normalize_stats)
    similarity = a @ mu.T / tau  # aᵀμ_k/τ [N,C]
    logits = similarity + a.square() @ s2.T / (2.0 * tau * tau)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    per_pixel = torch.logsumexp(logits, dim=1) - similarity.gather(1, safe[:, None])[:, 0]
    w = valid.to(per_pixel.dtype)
    return (per_pixel * w).sum() / w.sum().clamp_min(1.0)


def confident_pseudo_labels(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Pseudo-labels argmax softmax over dim 1 of logits [N,C] or [B,C,h,w], 255 where q < threshold.

    Returns (labels, q) with q = max softmax (detached). SDCA keeps target pixels with q ≥ 0.9,
    with the softmax confidence, as the paper and the current released code do (only the released
    code's first commit compared the raw maximum logit with the threshold).
    """
    q, labels = logits.detach().float().softmax(dim=1).max(dim=1)
    return torch.where(q >= threshold, labels, IGNORE_INDEX), q


__all__ = [
    "class_moments",
    "combine_pooled_stats",
    "confident_pseudo_labels",
    "pooled_stats_update",
    "sdca_logits",
    "sdca_loss",
]
