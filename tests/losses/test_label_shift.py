"""The label-shift correction of pseudo-labels (Saerens et al. 2002): Bayes' rule and its EM fixed point."""

from __future__ import annotations

import math

import pytest
import torch

from lpcgma.losses.contrast import update_class_freq
from lpcgma.losses.label_shift import em_prior_step, prior_corrected_probs


def _as_map(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).t().reshape(1, len(rows[0]), 1, len(rows))  # [1, C, 1, N]


def test_equal_priors_leave_the_probabilities_unchanged() -> None:
    probs = torch.rand(2, 4, 3, 3).softmax(dim=1)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(prior_corrected_probs(probs, prior, prior), probs)


def test_correction_follows_bayes_rule_by_hand() -> None:
    # p = (0.5, 0.5) under π_s = (0.8, 0.2); π_t = (0.2, 0.8): weights (0.25, 4) → (0.125, 2) / 2.125
    out = prior_corrected_probs(_as_map([[0.5, 0.5]]), torch.tensor([0.2, 0.8]), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.125 / 2.125, 2 / 2.125]))
    assert out.sum(dim=1).allclose(torch.ones(1))


def test_em_recovers_the_target_prior_of_a_bayes_optimal_source_classifier() -> None:
    # Two 1-D Gaussian classes (means ∓1, σ 1). The classifier is Bayes-optimal under π_s = (0.5, 0.5);
    # the target draws the classes 20 / 80 %. EM on its probabilities alone must find (0.2, 0.8).
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    labels = (torch.rand(n, generator=gen) < 0.8).long()
    x = torch.randn(n, generator=gen) + (2 * labels - 1).float()
    loglik = torch.stack([-0.5 * (x + 1) ** 2, -0.5 * (x - 1) ** 2])  # [2, N]
    probs = loglik.softmax(dim=0).reshape(1, 2, 1, n)
    source = torch.tensor([0.5, 0.5])
    prior = source.clone()
    for _ in range(200):  # momentum 0: batch EM
        prior = em_prior_step(prior, prior_corrected_probs(probs, prior, source), momentum=0.0)
    torch.testing.assert_close(prior, torch.tensor([0.2, 0.8]), atol=0.01, rtol=0)
    # the corrected labels are then more accurate than the uncorrected ones (the Bayes rule of the target)
    before = (probs.argmax(dim=1).flatten() == labels).float().mean()
    after = (prior_corrected_probs(probs, prior, source).argmax(dim=1).flatten() == labels).float().mean()
    assert after > before + 0.02, (before, after)


def test_online_em_step_is_a_running_average() -> None:
    prior = torch.tensor([0.5, 0.5])
    corrected = _as_map([[1.0, 0.0], [1.0, 0.0]])  # both pixels certainly class 0
    torch.testing.assert_close(em_prior_step(prior, corrected, momentum=0.9), torch.tensor([0.55, 0.45]))


def test_the_source_prior_starts_from_label_frequencies_ignoring_the_ignore_label() -> None:
    # SelfTraining's first prior step: update_class_freq with momentum 0 from the uniform start
    uniform = torch.full((4,), 0.25)
    labels = torch.tensor([[0, 0, 1, 255], [2, 255, 255, 0]])
    torch.testing.assert_close(update_class_freq(uniform, labels, 0.0), torch.tensor([0.6, 0.2, 0.2, 0.0]))
    torch.testing.assert_close(update_class_freq(uniform, torch.full((2, 2), 255), 0.0), torch.full((4,), 0.25))
    assert math.isclose(float(update_class_freq(uniform, labels, 0.0).sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_corrected_probabilities_stay_a_distribution(momentum: float) -> None:
    probs = torch.rand(2, 5, 4, 4).softmax(dim=1)
    source, target = torch.full((5,), 0.2), torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5])
    out = prior_corrected_probs(probs, target, source)
    assert torch.allclose(out.sum(dim=1), torch.ones(2, 4, 4)) and (out >= 0).all()
    stepped = em_prior_step(target, out, momentum)
    assert math.isclose(float(stepped.sum()), 1.0, rel_tol=1e-5)
