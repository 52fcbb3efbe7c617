"""Label-shift correction of pseudo-labels: the teacher's class prior moved to the target's.

A network trained on the source predicts p(c|x) under the source's class frequencies π_s. When the
target's frequencies π_t differ (rural fields are mostly farmland, urban tiles mostly buildings),
Bayes' rule gives the target posterior

    p_t(c|x) = p(c|x) · π_t(c)/π_s(c) / Σ_k p(k|x) · π_t(k)/π_s(k)        (Saerens et al., 2002)

and π_t, unknown without target labels, is the fixed point of EM: π_t = E_x[p_t(·|x)]. Online, the
expectation is a running average over the target batches (`em_prior_step`). Pure functions.
"""

from __future__ import annotations

from torch import Tensor

_EPS = 1e-6


def prior_corrected_probs(probs: Tensor, target_prior: Tensor, source_prior: Tensor) -> Tensor:
    """p_t(c|x) ∝ p(c|x)·π_t(c)/π_s(c) for probs [B,C,H,W] and priors [C]; rows sum to 1."""
    ratio = target_prior / source_prior.clamp_min(_EPS)
    weighted = probs * ratio.view(1, -1, 1, 1).to(probs.dtype)
    return weighted / weighted.sum(dim=1, keepdim=True).clamp_min(_EPS)


def em_prior_step(prior: Tensor, corrected_probs: Tensor, momentum: float) -> Tensor:
    """One online EM step on the target prior: π ← m·π + (1 − m)·mean over pixels of p_t(·|x)."""
    return momentum * prior + (1 - momentum) * corrected_probs.mean(dim=(0, 2, 3)).to(prior.dtype)
