"""BiDA: bi-directional pixel-prototype contrastive learning (Lee et al., ECCV 2022) as pure functions.

Prototypes are class means of segmentation features (source: labels, target: pseudo-labels, per
image as in the released code). One contrastive function serves both directions:

- forward (FCL): target pixels vs source prototypes, CE with target pseudo-labels;
- backward (BCL): source pixels vs target prototypes, CE with source labels;

with logits scale·cos(f, c_k) and classes weighted 1 only where present in both images. Dynamic
pseudo-labels transfer labels from (calibrated) source prototypes to target pixels; they are combined
with the classifier's static pseudo-labels into hybrid labels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lpcgma.losses.precision import float32
from lpcgma.losses.segmentation import IGNORE_INDEX, entropy_map

HybridRule = Literal["agree", "confident", "static"]
AbsentRule = Literal["drop", "negative"]
# the released code's entropy term: H_s + this · H_t (docs/METHODS.md, BiDA, difference 4b)
RELEASED_TARGET_ENTROPY_WEIGHT = 0.3


def _pixels_last(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """[B,D,h,w] + [B,h,w] → [B,h·w,D] + [B,h·w]; [..., N, D] + [..., N] unchanged."""
    if feats.dim() == 4:
        return feats.flatten(2).transpose(1, 2), labels.flatten(1)
    return feats, labels


@float32
def class_prototypes(feats: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means c_k = Σ_i 1[y_i = k]·f_i / Σ_i 1[y_i = k] and which classes are present.

    - feats [N,D], labels [N] → protos [C,D], present [C] (one set of pixels);
    - feats [B,D,h,w], labels [B,h,w] → protos [B,C,D], present [B,C] (per image, released code);
    - feats [B,N,D], labels [B,N] → protos [B,C,D], present [B,C].
    Label 255 is ignored; absent classes get a zero prototype and present False. Differentiable in
    feats (detach the result for fixed prototypes); computed in float32 or wider.
    """
    f, y = _pixels_last(feats, labels)
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    batch_shape = f.shape[:-2]
    n, d = f.shape[-2:]
    f = f.reshape(math.prod(batch_shape), n, d)
    y = y.reshape(f.shape[0], n)
    valid = y != IGNORE_INDEX
    offsets = torch.arange(f.shape[0], device=f.device)[:, None] * num_classes
    index = (torch.where(valid, y, 0) + offsets).flatten()
    w = valid.to(f.dtype).flatten()
    sums = f.new_zeros(f.shape[0] * num_classes, d).index_add(0, index, f.reshape(-1, d) * w[:, None])
    counts = f.new_zeros(f.shape[0] * num_classes).index_add(0, index, w)
    protos = sums / counts.clamp_min(1.0)[:, None]
    return protos.reshape(*batch_shape, num_classes, d), (counts > 0).reshape(*batch_shape, num_classes)


def _cosine_logits(
    feats: Tensor, protos: Tensor, scale: float, present: Tensor | None, absent: AbsentRule = "drop"
) -> Tensor:
    """scale·cos(f_i, c_k) [..., N, C]. Classes with present False: ``drop`` gives them the lowest
    finite logit (out of the softmax), ``negative`` sets their cosine to −1 (logit −scale, the
    released code's choice); with present None every class keeps its cosine (0 for a zero prototype)."""
    dtype = torch.promote_types(feats.dtype, torch.float32)
    f = F.normalize(feats.to(dtype), dim=-1)
    c = F.normalize(protos.to(dtype), dim=-1)
    cos = f @ c.transpose(-1, -2)
    if present is None:
        return scale * cos
    if absent == "negative":
        return scale * cos.masked_fill(~present[..., None, :], -1.0)
    if absent == "drop":
        return (scale * cos).masked_fill(~present[..., None, :], torch.finfo(dtype).min)
    raise ValueError(f"absent-prototype rule {absent!r} is invalid: expected 'drop' or 'negative'")


@float32
def prototype_contrast_loss(
    feats: Tensor,
    labels: Tensor,
    protos: Tensor,
    class_weight: Tensor,
    scale: float = 10.0,
    proto_present: Tensor | None = None,
    absent: AbsentRule = "drop",
) -> Tensor:
    """Pixel-to-prototype contrast Σ_i w_{y_i}·ℓ_i / Σ_i w_{y_i}, ℓ_i = −log softmax_k(s·cos(f_i, c_k))_{y_i}.

    One function for both directions:
    - FCL: feats = target pixels, labels = target (hybrid) pseudo-labels, protos = source prototypes;
    - BCL: feats = source pixels, labels = source labels, protos = target prototypes.
    Shapes: feats [N,D] (or [B,N,D]), labels [N] (or [B,N]; 255 ignored), protos [C,D] (or
    [B,C,D], pairing source and target image b), class_weight [C] (or [B,C]): 1 where class k is
    present in both images, 0 elsewhere; pixels of 0-weight classes are dropped. s = 10 (code).
    ``proto_present`` [C] (or [B,C]), when given, marks which prototypes exist: ``absent="drop"``
    removes the others from the softmax, ``absent="negative"`` keeps them at cosine −1 (the released
    code); pixels whose own class has no prototype are dropped either way. None keeps every class as
    it is (a zero prototype then has logit 0). Prototypes are used as given: detach them for fixed
    anchors, or keep their graph for gradients into the features they were averaged from (released code).
    Returns 0 with a graph when no pixel has positive weight; never NaN.
    """
    f, y = _pixels_last(feats, labels)
    logits = _cosine_logits(f, protos, scale, proto_present, absent)
    valid = y != IGNORE_INDEX
    safe = torch.where(valid, y, 0)
    logp = logits.log_softmax(dim=-1).gather(-1, safe[..., None])[..., 0]
    cw = class_weight.to(logp.dtype).expand(*safe.shape[:-1], class_weight.shape[-1])
    w = cw.gather(-1, safe) * valid.to(logp.dtype)
    if proto_present is not None:  # a pixel whose class has no prototype has no positive
        present = proto_present.expand(*safe.shape[:-1], proto_present.shape[-1])
        w = w * present.gather(-1, safe).to(w.dtype)
    total = w.sum()
    return -(w * logp).sum() / torch.where(total > 0, total, torch.ones_like(total))


@torch.no_grad()
@float32
def dynamic_pseudo_labels(
    feats_t: Tensor,
    protos_s: Tensor,
    present: Tensor,
    scale: float = 10.0,
    threshold: float = 0.8,
    bias: Tensor | None = None,
    alpha: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Non-parametric label transfer: p_i = softmax_k(s·cos(f_i, c_s^k + α·b_k)), ŷ_i = argmax p_i.

    feats_t [N,D] (or [B,N,D], or [B,D,h,w] giving [B,h·w] labels), protos_s [C,D] (or per image
    [B,C,D]), present [C] (or [B,C]): only source classes with a prototype compete; bias [C,D] the
    calibration b_k (None = none), α from ``calibration_alpha``. Returns (labels with 255 where
    max p < threshold or no class is present, confidence = max p or 0). Detached.
    Code defaults: s = 10, threshold 0.8.
    """
    f = feats_t.flatten(2).transpose(1, 2) if feats_t.dim() == 4 else feats_t
    centres = protos_s if bias is None else protos_s + alpha * bias.to(protos_s.dtype)
    probs = _cosine_logits(f, centres, scale, present).softmax(dim=-1)
    conf, labels = probs.max(dim=-1)
    any_present = present.any(dim=-1, keepdim=True)
    conf = torch.where(any_present, conf, torch.zeros_like(conf))
    return torch.where(any_present & (conf >= threshold), labels, IGNORE_INDEX), conf


def hybrid_pseudo_labels(
    static: Tensor, static_conf: Tensor, dynamic: Tensor, dynamic_conf: Tensor, rule: HybridRule = "agree"
) -> Tensor:
    """Combine static (classifier) and dynamic (prototype) pseudo-labels, same shape, 255 = none.

    ``static``: the classifier's labels as they are (the released code trains on static labels
    only; its dynamic label transfer is never used).
    ``agree`` (default): keep a label only where both are valid and equal, else 255. Chosen as the
    default because the two confidences come from different heads (classifier softmax vs cosine
    softmax at scale 10) and are not calibrated against each other, and because agreement is the
    conservative reading of "combined into hybrid labels": the dynamic labels exist to filter the
    classifier's source-biased mistakes. ``confident``: where both are valid and disagree take the
    more confident one (ties: static); where only one is valid take it; else 255.
    """
    s_valid = static != IGNORE_INDEX
    d_valid = dynamic != IGNORE_INDEX
    if rule == "static":
        return static
    if rule == "agree":
        return torch.where(s_valid & (static == dynamic), static, IGNORE_INDEX)
    if rule == "confident":
        take_dynamic = d_valid & (~s_valid | (dynamic_conf > static_conf))
        return torch.where(take_dynamic, dynamic, static)
    raise ValueError(f"hybrid rule {rule!r} is invalid: expected 'agree', 'confident' or 'static'")


def ema_update(state: Tensor, new: Tensor, mask: Tensor, momentum: float) -> Tensor:
    """state_k ← m·state_k + (1 − m)·new_k where mask_k [C], else unchanged; rows k, detached.

    Serves the calibration bias and, with ``bida_proto_momentum`` > 0, prototypes across batches.
    """
    new = new.detach().to(state.dtype)
    return torch.where(mask[:, None], momentum * state + (1.0 - momentum) * new, state)


def update_bias(
    bias: Tensor, protos_t: Tensor, protos_s: Tensor, present_both: Tensor, momentum: float = 0.99
) -> Tensor:
    """Calibration EMA b_k ← m·b_k + (1 − m)·(c_t^k − c_s^k) for classes present in both domains.

    bias [C,D]; protos_t, protos_s [C,D] with present_both [C], or per image [B,C,D] with [B,C]:
    then c_t^k − c_s^k is averaged over the images where class k is present in both. Detached.
    """
    diff = (protos_t - protos_s).detach()
    if diff.dim() == 3:
        w = present_both.to(diff.dtype)
        diff = (diff * w[..., None]).sum(dim=0) / w.sum(dim=0).clamp_min(1.0)[:, None]
        present_both = present_both.any(dim=0)
    return ema_update(bias, diff, present_both, momentum)


def calibration_alpha(step: int, total_steps: int) -> float:
    """α_t = step / total_steps clipped to [0, 1]: the calibration ramps linearly from 0 to 1."""
    if total_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / total_steps))


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean over pixels of the normalised entropy −Σ_k p_k log p_k / log C of logits [B,C,h,w]."""
    return entropy_map(logits).mean()


@float32
def released_entropy_loss(logits: Tensor) -> Tensor:
    """The released code's entropy term of one domain: mean over pixels of −Σ_k p_k·log q_k with
    p = softmax(logits) and q = softmax(p) (log_softmax applied to probabilities), logits [B,C,h,w].

    Not normalised; since p ∈ [0, 1], q is close to uniform and the value stays near log C with a
    small gradient. BiDA's ``bida_entropy=released`` uses H_s + 0.3·H_t of this (docs/METHODS.md).
    """
    p = logits.softmax(dim=1)
    return -(p * p.log_softmax(dim=1)).sum(dim=1).mean()


__all__ = [
    "RELEASED_TARGET_ENTROPY_WEIGHT",
    "AbsentRule",
    "HybridRule",
    "calibration_alpha",
    "class_prototypes",
    "dynamic_pseudo_labels",
    "ema_update",
    "entropy_loss",
    "hybrid_pseudo_labels",
    "prototype_contrast_loss",
    "released_entropy_loss",
    "update_bias",
]
