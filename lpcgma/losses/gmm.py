"""Gaussian multiprototypes: per-class diagonal GMMs, their class scores, forward alignment, batched EM.

Every class c is a mixture of K diagonal Gaussians (π_ck, μ_ck, σ²_ck) held as [C, K, ...] tensors
(`GMMParams`). Log-densities are computed in expanded form with one matmul over the features
[x², x] (never an [N, C, K, D] tensor):

    log π + log N(x; μ, diag σ²) = [x², x]·[−½σ⁻², μσ⁻²] + log π − ½(D log 2π + Σ log σ² + Σ μ²σ⁻²).

`batched_em` fits all C classes at once as one batched tensor program (two `bmm`s per iteration).
Inactive components (classes with fewer samples than K, or no samples) are masked by `active`;
nothing here produces NaN, and the loss functions never synchronise with the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lpcgma.losses.precision import float32
from lpcgma.losses.segmentation import IGNORE_INDEX

NEG_SCORE = -1e9  # finite class score (and masked log-prob) of a class with no active component
_MIN_COUNT = 1e-6  # a component with less total responsibility than this keeps its previous μ, σ²


class GMMParams(NamedTuple):
    """Per-class diagonal GMMs. Inactive components: μ = 0, σ² = 1, log π = −inf."""

    means: Tensor  # [C, K, D] μ_ck
    variances: Tensor  # [C, K, D] σ²_ck (≥ the variance floor)
    log_weights: Tensor  # [C, K] log π_ck (each class's active weights sum to 1)
    active: Tensor  # [C, K] bool: component exists


# ------------------------------------------------------------------------------------- densities
def _affine_terms(means: Tensor, variances: Tensor, log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """W [C, K, 2D] and b [C, K] with log π + log N(x) = [x², x]·W + b (finite for finite inputs)."""
    d = means.shape[-1]
    prec = variances.reciprocal()
    w = torch.cat([-0.5 * prec, means * prec], dim=-1)
    logw = torch.where(torch.isfinite(log_weights), log_weights, torch.zeros_like(log_weights))
    b = logw - 0.5 * (d * math.log(2 * math.pi) + variances.log().sum(-1) + (means * means * prec).sum(-1))
    return w, b


def _masked_component_log_prob(z: Tensor, params: GMMParams, fill: float) -> Tensor:
    c, k, d = params.means.shape
    w, b = _affine_terms(params.means, params.variances, params.log_weights)
    zf = z.to(params.means.dtype)
    feats = torch.cat([zf * zf, zf], dim=-1)  # [N, 2D]
    lp = torch.addmm(b.reshape(c * k), feats, w.reshape(c * k, 2 * d).T).view(-1, c, k)
    return lp.masked_fill(~params.active, fill)


@float32
def component_log_prob(z: Tensor, params: GMMParams) -> Tensor:
    """log π_ck + log N(z; μ_ck, diag σ²_ck) for every pixel, class and component: [N, C, K].

    `z` [N, D]. Inactive components are −inf. Differentiable w.r.t. `z` (and the parameters).
    """
    return _masked_component_log_prob(z, params, float("-inf"))


@float32
def class_scores(z: Tensor, params: GMMParams) -> Tensor:
    """GMM class scores s_c(z) = logsumexp_k [log π_ck + log N(z; μ_ck, σ²_ck)]: [N, C].

    A class with no active component scores `NEG_SCORE` (finite, zero gradient), never NaN.
    """
    lp = _masked_component_log_prob(z, params, NEG_SCORE)
    s = torch.logsumexp(lp, dim=-1)
    return torch.where(params.active.any(-1), s, torch.full_like(s, NEG_SCORE))


@float32
def forward_alignment_loss(
    z: Tensor,
    pseudo_labels: Tensor,
    confidence: Tensor,
    params: GMMParams,
    tau: float,
    threshold: float,
    confidence_weighting: bool,
) -> Tensor:
    """Forward alignment L_FWD = CE(s(z)/τ, ŷ) over reliable target pixels.

    `z` [N, D] student target embeddings; `pseudo_labels` [N] (255 = ignore) and `confidence` [N]
    from the teacher. A pixel counts when q ≥ `threshold`, ŷ is a class id and ŷ's GMM has an
    active component. With `confidence_weighting` each CE is multiplied by q. The result is the sum
    over counted pixels divided by their number (DACS-style weighted mean); 0 with a graph when no
    pixel counts.
    """
    c = params.means.shape[0]
    scores = class_scores(z, params) / tau
    y = pseudo_labels.reshape(-1)
    q = confidence.reshape(-1).to(scores.dtype)
    in_range = (y >= 0) & (y < c) & (y != IGNORE_INDEX)
    y_safe = torch.where(in_range, y, torch.zeros_like(y))
    ok = in_range & (q >= threshold) & params.active.any(-1)[y_safe]
    ce = F.cross_entropy(scores, y_safe, reduction="none")
    w = q if confidence_weighting else torch.ones_like(q)
    per_pixel = torch.where(ok, ce * w, torch.zeros_like(ce))
    return per_pixel.sum() / ok.sum().clamp_min(1)


# ------------------------------------------------------------------------------------- batched EM
def _prepare(x: Tensor, valid: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre each class on its valid mean and build the features [x², x] once.

    Returns feats [C, M, 2D] (rows of invalid samples exactly 0; ``feats[..., D:]`` is the centred
    x), the shift (per-class mean) [C, D], the valid counts n [C] and the valid mask as floats [C, M].
    One large allocation and in-place arithmetic: fresh multi-MB temporaries cost page faults.
    """
    c, m, d = x.shape
    vf = valid.to(dtype)
    xs = x.to(dtype)
    n = vf.sum(1)
    shift = torch.bmm(vf[:, None, :], xs).squeeze(1) / n.clamp_min(1.0)[:, None]
    feats = torch.empty(c, m, 2 * d, dtype=dtype, device=x.device)
    xc = feats[..., d:]
    torch.sub(xs, shift[:, None, :], out=xc)
    xc.mul_(vf[..., None])
    torch.mul(xc, xc, out=feats[..., :d])
    return feats, shift, n, vf


def _e_step(feats: Tensor, means: Tensor, variances: Tensor, log_weights: Tensor, active: Tensor) -> Tensor:
    """Component log-probs of each class's own samples, laid out [C, K, M] (inactive → NEG_SCORE).

    `feats` [C, M, 2D] = [x², x]. The [C, K, M] layout makes the reductions over K (softmax,
    logsumexp) contiguous, which is several times faster on CPU than reducing a last dim of size K.
    """
    w, b = _affine_terms(means, variances, log_weights)
    lp = torch.bmm(feats, w.transpose(1, 2)).transpose(1, 2).contiguous()
    lp.add_(b[..., None])
    return lp.masked_fill_(~active[..., None], NEG_SCORE)


def _responsibilities(lp: Tensor, vf: Tensor) -> Tensor:
    """Softmax over K of log-probs [C, K, M], zeroed on invalid samples.

    Exponents are clamped at −80 (a weight below e⁻⁸⁰ is 0 for every purpose): exp producing
    denormals is ~10× slower on CPU.
    """
    e = (lp - lp.amax(1, keepdim=True)).clamp_min_(-80.0).exp_()
    return e.div_(e.sum(1, keepdim=True)).mul_(vf[:, None, :])


def _m_step(
    feats: Tensor,
    resp: Tensor,
    n: Tensor,
    prev_means: Tensor,
    prev_vars: Tensor,
    active: Tensor,
    var_floor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Means, floored variances and log weights from responsibilities [C, K, M] (one bmm)."""
    d = prev_means.shape[-1]
    nk = resp.sum(2)  # [C, K]
    stats = torch.bmm(resp, feats)  # [C, K, 2D]: Σ r x², Σ r x
    ok = (nk > _MIN_COUNT)[..., None]
    nk_safe = torch.where(nk > _MIN_COUNT, nk, torch.ones_like(nk))[..., None]
    mean = torch.where(ok, stats[..., d:] / nk_safe, prev_means)
    var = torch.where(ok, stats[..., :d] / nk_safe - mean * mean, prev_vars).clamp_min(var_floor)
    tiny = torch.finfo(nk.dtype).tiny
    log_w = nk.clamp_min(tiny).log() - n.clamp_min(1.0).log()[:, None]
    log_w = log_w.masked_fill(~active, float("-inf"))
    return mean, var, log_w


def _kmeans_pp(xc: Tensor, sq: Tensor, vf: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Greedy k-means++ seeding (as sklearn) for every class at once: centres [C, K, D] from valid samples.

    Each new centre is the best (lowest resulting potential Σ min-distance²) of 2 + ⌊ln K⌋
    candidates drawn with probability ∝ distance² to the nearest chosen centre.
    """
    c, m, d = xc.shape
    trials = 2 + int(math.log(k))
    keys = torch.rand(c, m, generator=generator, device=xc.device, dtype=xc.dtype)
    first = torch.where(vf > 0, keys, torch.full_like(keys, -1.0)).argmax(1)  # [C]
    centres = [xc.gather(1, first[:, None, None].expand(c, 1, d))]
    d2 = (sq - 2 * torch.bmm(xc, centres[0].transpose(1, 2)).squeeze(2) + sq.gather(1, first[:, None])).clamp_min(0)
    for _ in range(1, k):
        w = d2 * vf
        w = torch.where(w.sum(1, keepdim=True) > 0, w, vf)  # all valid points coincide with a centre
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # empty class: anything
        cand = torch.multinomial(w, trials, replacement=True, generator=generator)  # [C, L]
        cx = xc.gather(1, cand[..., None].expand(c, trials, d))  # [C, L, D]
        dist = (sq[..., None] - 2 * torch.bmm(xc, cx.transpose(1, 2)) + sq.gather(1, cand)[:, None, :]).clamp_min(0)
        new_d2 = torch.minimum(d2[..., None], dist)  # [C, M, L]
        best = (new_d2 * vf[..., None]).sum(1).argmin(1)  # [C]
        centres.append(cx.gather(1, best[:, None, None].expand(c, 1, d)))
        d2 = new_d2.gather(2, best[:, None, None].expand(c, m, 1)).squeeze(2)
    return torch.cat(centres, dim=1)


def _hard_assign(xc: Tensor, sq: Tensor, centres: Tensor, vf: Tensor, active: Tensor) -> Tensor:
    """One-hot responsibilities [C, K, M] of each sample to its nearest active centre.

    A running minimum over the K rows (K is small) instead of an argmin across a strided dim.
    """
    k = centres.shape[1]
    cn = (centres * centres).sum(-1)  # [C, K]
    dist = sq[:, None, :] - 2 * torch.bmm(centres, xc.transpose(1, 2)) + cn[..., None]  # [C, K, M]
    dist = dist.masked_fill_(~active[..., None], float("inf"))
    best_d, best_k = dist[:, 0], torch.zeros_like(sq, dtype=torch.long)
    for j in range(1, k):
        closer = dist[:, j] < best_d
        best_d = torch.where(closer, dist[:, j], best_d)
        best_k = best_k.masked_fill(closer, j)
    ks = torch.arange(k, device=xc.device)[None, :, None]
    return (best_k[:, None, :] == ks).to(xc.dtype).mul_(vf[:, None, :])


@float32
def batched_em(
    x: Tensor,
    valid: Tensor,
    k: int,
    iters: int,
    var_floor: float,
    init: GMMParams | None = None,
    generator: torch.Generator | None = None,
) -> GMMParams:
    """Fit a K-component diagonal GMM to every class's samples at once.

    `x` [C, M, D] samples (rows where `valid` [C, M] is False are ignored; they must be finite,
    e.g. zeros). Class c gets min(K, n_c) active components (n_c = its valid count): an empty
    class has none. Initialisation: with `init`, a warm start from its parameters for every class whose active
    pattern is still min(K, n_c) components; otherwise (and always when `init` is None) batched
    greedy k-means++ seeding, hard assignment and one M-step (as sklearn's
    ``init_params="k-means++"``). Then `iters` EM iterations (fixed count, no convergence test;
    the only host sync is the warm-start check). Variances are floored at `var_floor` (max, not
    added); a component that loses all responsibility keeps its previous μ and σ². The data are
    centred per class internally for numerical accuracy. Float16/bfloat16 inputs are fitted in
    float32; the parameters are returned in the compute dtype.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    c, m, d = x.shape
    feats, shift, n, vf = _prepare(x, valid, dtype)
    xc = feats[..., d:]  # centred samples, invalid rows exactly 0
    active = torch.arange(k, device=x.device)[None, :] < n[:, None]  # [C, K]

    def seeded() -> tuple[Tensor, Tensor, Tensor]:
        sq = feats[..., :d].sum(-1)  # [C, M] squared norms
        pooled_var = (feats[..., :d].sum(1) / n.clamp_min(1.0)[:, None]).clamp_min(var_floor)  # [C, D]
        centres = _kmeans_pp(xc, sq, vf, k, generator)
        resp = _hard_assign(xc, sq, centres, vf, active)
        return _m_step(feats, resp, n, centres, pooled_var[:, None, :].expand(c, k, d), active, var_floor)

    if init is None:
        means, variances, log_w = seeded()
    else:
        means = init.means.to(dtype) - shift[:, None, :]
        variances = init.variances.to(dtype).clamp_min(var_floor)
        log_w = init.log_weights.to(dtype).masked_fill(~active, float("-inf"))
        stale = (init.active != active).any(-1)  # [C]
        if bool(stale.any()):
            s_means, s_vars, s_logw = seeded()
            sel = stale[:, None, None]
            means = torch.where(sel, s_means, means)
            variances = torch.where(sel, s_vars, variances)
            log_w = torch.where(stale[:, None], s_logw, log_w)

    for _ in range(iters):
        lp = _e_step(feats, means, variances, log_w, active)
        resp = _responsibilities(lp, vf)
        means, variances, log_w = _m_step(feats, resp, n, means, variances, active, var_floor)

    act = active[..., None]
    return GMMParams(
        means=torch.where(act, means + shift[:, None, :], torch.zeros_like(means)),
        variances=torch.where(act, variances, torch.ones_like(variances)),
        log_weights=log_w.masked_fill(~active, float("-inf")),
        active=active,
    )


@float32
def gmm_mean_log_likelihood(x: Tensor, valid: Tensor, params: GMMParams) -> Tensor:
    """Mean log-likelihood of each class's valid samples under that class's GMM: [C].

    `x` [C, M, D], `valid` [C, M]. Classes with no valid sample give 0; a class with samples but no
    active component gives about `NEG_SCORE`.
    """
    feats, shift, n, vf = _prepare(x, valid, params.means.dtype)
    means = params.means - shift[:, None, :]
    lp = _e_step(feats, means, params.variances, params.log_weights, params.active)
    ll = (torch.logsumexp(lp, dim=1) * vf).sum(1)
    return torch.where(n > 0, ll / n.clamp_min(1.0), torch.zeros_like(ll))


__all__ = [
    "NEG_SCORE",
    "GMMParams",
    "batched_em",
    "class_scores",
    "component_log_prob",
    "forward_alignment_loss",
    "gmm_mean_log_likelihood",
]
