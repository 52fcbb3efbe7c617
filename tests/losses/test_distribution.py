"""SDCA (lpcgma.losses.distribution): pooled class statistics and the distribution-aware bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.losses.distribution import (
    class_moments,
    combine_pooled_stats,
    confident_pseudo_labels,
    pooled_stats_update,
    sdca_logits,
    sdca_loss,
)

IGNORE = 255
FAST = settings(max_examples=25, deadline=None)


def _labels(gen: torch.Generator, n: int, c: int, ignore_frac: float = 0.2) -> torch.Tensor:
    y = torch.randint(0, c, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < ignore_frac, torch.full_like(y, IGNORE), y)


def _reference_sdca(feats, labels, mean, var, tau, normalize_stats):
    """Plain per-pixel loop of ℓ = −aᵀμ_y/τ + log Σ_k exp(aᵀμ_k/τ + aᵀdiag(σ²_k)a/(2τ²)), float64."""
    mean, var = mean.double(), var.double()
    if normalize_stats:
        mean = torch.stack([m / max(m.norm().item(), 1e-12) for m in mean])
        var = torch.stack([v / max(v.norm().item(), 1e-12) for v in var])
    total, count = 0.0, 0
    for f, y in zip(feats.double(), labels.tolist(), strict=True):
        if y == IGNORE:
            continue
        a = f / max(f.norm().item(), 1e-12)
        terms = [
            (a @ mean[k]).item() / tau + (a * a @ var[k]).item() / (2 * tau * tau) for k in range(len(mean))
        ]
        top = max(terms)
        lse = top + math.log(sum(math.exp(t - top) for t in terms))
        total += -(a @ mean[y]).item() / tau + lse
        count += 1
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ loss
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    d=st.integers(1, 8),
    c=st.integers(2, 6),
    tau=st.sampled_from([0.1, 1.0, 100.0]),
    normalize_stats=st.booleans(),
)
def test_sdca_loss_matches_per_pixel_loop(seed, n, d, c, tau, normalize_stats):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = _labels(gen, n, c)
    mean = torch.randn(c, d, generator=gen, dtype=torch.float64)
    var = torch.rand(c, d, generator=gen, dtype=torch.float64) * 2
    got = sdca_loss(feats, labels, mean, var, tau, normalize_stats)
    want = _reference_sdca(feats, labels, mean, var, tau, normalize_stats)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_sdca_loss_equals_released_code_decomposition():
    """Released code: CE(z, y) + ½·Σ_d a_d² σ²_{y,d}/τ², with z the per-class terms (same value)."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(50, 6, generator=gen), _labels(gen, 50, 5)
    mean, var = torch.randn(5, 6, generator=gen), torch.rand(5, 6, generator=gen)
    tau = 0.5
    z = sdca_logits(feats, mean, var, tau)
    keep = labels != IGNORE
    a = F.normalize(feats[keep], dim=1)
    s2 = F.normalize(var, dim=1)
    released = F.cross_entropy(z[keep], labels[keep]) + 0.5 * (a**2 * s2[labels[keep]]).sum(1).mean() / tau**2
    assert sdca_loss(feats, labels, mean, var, tau).item() == pytest.approx(released.item(), rel=1e-5)


def test_sdca_loss_feature_normalisation_is_inside():
    gen = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(30, 4, generator=gen), _labels(gen, 30, 3)
    mean, var = torch.randn(3, 4, generator=gen), torch.rand(3, 4, generator=gen)
    a = sdca_loss(feats, labels, mean, var, 1.0)
    b = sdca_loss(7.0 * feats, labels, mean, var, 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_sdca_loss_no_valid_pixel_is_zero_with_graph():
    feats = torch.randn(10, 4, requires_grad=True)
    labels = torch.full((10,), IGNORE)
    loss = sdca_loss(feats, labels, torch.zeros(3, 4), torch.zeros(3, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert feats.grad is not None and torch.all(feats.grad == 0)


def test_sdca_loss_empty_stats_and_zero_features_are_finite():
    """Unseen classes (μ = σ² = 0) and zero feature vectors give a finite loss and gradient."""
    feats = torch.zeros(4, 3)
    feats[2:] = torch.randn(2, 3)
    feats.requires_grad_(True)
    loss = sdca_loss(feats, torch.tensor([0, 1, 2, IGNORE]), torch.zeros(3, 3), torch.zeros(3, 3))
    loss.backward()
    assert feats.grad is not None and torch.isfinite(loss) and torch.isfinite(feats.grad).all()
    assert loss.item() == pytest.approx(math.log(3))


def test_sdca_loss_stats_are_detached_and_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = _labels(gen, 12, 4)
    mean = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    var = torch.rand(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f: sdca_loss(f, labels, mean, var, 0.3, False), (feats,))
    sdca_loss(feats, labels, mean, var, 0.3).backward()
    assert mean.grad is None and var.grad is None


# ------------------------------------------------------------------- the bound, by Monte Carlo
def _gaussian_setup(seed: int, c: int, d: int, var_scale: float):
    gen = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    mean = torch.randn(c, d, generator=gen, dtype=torch.float64)
    var = var_scale * (0.5 + torch.rand(c, d, generator=gen, dtype=torch.float64))
    return gen, a, mean, var


def _samples(gen, mean, var, s):
    """s draws of one pair set: ã_k ~ N(μ_k, diag σ²_k) independently for every class k: [s,C,D]."""
    return mean + var.sqrt() * torch.randn(s, *mean.shape, generator=gen, dtype=mean.dtype)


def test_gaussian_mgf_identity_by_monte_carlo():
    """E[exp(aᵀã/τ)] = exp(aᵀμ/τ + aᵀΣa/(2τ²)) for ã ~ N(μ, diag σ²)."""
    gen, a, mean, var = _gaussian_setup(3, 4, 6, var_scale=0.2)
    tau = 1.5
    draws = torch.exp(_samples(gen, mean, var, 400_000) @ a / tau)  # [s, C]
    mc, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    closed = torch.exp(mean @ a / tau + (a * a) @ var.T / (2 * tau**2))
    assert torch.all((mc - closed).abs() < 5 * se)
    torch.testing.assert_close(mc, closed, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_bound_upper_bounds_expected_finite_sample_contrastive_loss(tau):
    """ℓ_closed = −aᵀμ_y/τ + log Σ_k E[exp(aᵀã_k/τ)] ≥ E[−aᵀã_y/τ + log Σ_k exp(aᵀã_k/τ)] (Jensen).

    The right side is the InfoNCE loss of one positive ã_y and negatives ã_k (k ≠ y), each drawn
    from its class Gaussian, averaged over draws (the loss with infinitely many pair sets). With
    large variances the gap is clearly positive; the closed form is exactly the log of the MC
    estimate of Σ_k E[exp(·)], which the MGF gives.
    """
    c, d, y, s = 5, 6, 2, 200_000
    gen, a, mean, var = _gaussian_setup(4, c, d, var_scale=1.0)
    closed = sdca_loss(a[None], torch.tensor([y]), mean, var, tau, normalize_stats=False).item()
    proj = _samples(gen, mean, var, s) @ a / tau  # aᵀã_k/τ: [s, C]
    finite = -proj[:, y] + torch.logsumexp(proj, dim=1)
    mc, se = finite.mean().item(), finite.std().item() / math.sqrt(s)
    assert closed >= mc + 4 * se, "the bound must hold, strictly here (large variances)"
    exact_inf = (-(a @ mean[y]) / tau + torch.log(torch.exp(proj).mean(0).sum())).item()
    assert closed == pytest.approx(exact_inf, abs=0.03)


def test_bound_is_tight_for_small_variances():
    c, d, y, s, tau = 5, 6, 1, 20_000, 1.0
    gen, a, mean, var = _gaussian_setup(5, c, d, var_scale=1e-5)
    closed = sdca_loss(a[None], torch.tensor([y]), mean, var, tau, normalize_stats=False).item()
    proj = _samples(gen, mean, var, s) @ a / tau
    mc = (-proj[:, y] + torch.logsumexp(proj, dim=1)).mean().item()
    assert closed >= mc - 1e-4
    assert closed - mc < 1e-4
    zero_var = sdca_loss(a[None], torch.tensor([y]), mean, 0 * var, tau, normalize_stats=False).item()
    assert closed - zero_var == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------------------ pooled statistics
def _numpy_class_stats(feats: np.ndarray, labels: np.ndarray, c: int):
    count = np.zeros(c)
    mean = np.zeros((c, feats.shape[1]))
    var = np.zeros((c, feats.shape[1]))
    for k in range(c):
        xs = feats[labels == k]
        count[k] = len(xs)
        if len(xs):
            mean[k], var[k] = xs.mean(0), xs.var(0)
    return count, mean, var


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 120),
    d=st.integers(1, 5),
    c=st.integers(1, 6),
    batches=st.integers(1, 6),
    offset=st.sampled_from([0.0, 50.0]),
)
def test_pooled_stats_update_equals_statistics_of_concatenated_data(seed, n, d, c, batches, offset):
    rng = np.random.default_rng(seed)
    feats = rng.normal(offset, 2.0, size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    labels = rng.integers(0, c, size=n)
    labels[rng.uniform(size=n) < 0.2] = IGNORE
    cuts = np.sort(rng.integers(0, n + 1, size=batches - 1))
    count = torch.zeros(c, dtype=torch.float64)
    mean = torch.zeros(c, d, dtype=torch.float64)
    var = torch.zeros(c, d, dtype=torch.float64)
    for xs, ys in zip(np.split(feats, cuts), np.split(labels, cuts), strict=True):
        count, mean, var = pooled_stats_update(count, mean, var, torch.from_numpy(xs), torch.from_numpy(ys))
    want_n, want_mean, want_var = _numpy_class_stats(feats, labels, c)
    np.testing.assert_array_equal(count.numpy(), want_n)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-9, atol=1e-9)


def test_pooled_stats_float32_with_int_count():
    rng = np.random.default_rng(0)
    feats = rng.normal(3.0, 1.0, size=(5000, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=5000)
    count = torch.zeros(4, dtype=torch.int64)
    mean, var = torch.zeros(4, 8), torch.zeros(4, 8)
    for xs, ys in zip(np.array_split(feats, 7), np.array_split(labels, 7), strict=True):
        count, mean, var = pooled_stats_update(count, mean, var, torch.from_numpy(xs), torch.from_numpy(ys))
    want_n, want_mean, want_var = _numpy_class_stats(feats.astype(np.float64), labels, 4)
    assert count.dtype == torch.int64 and mean.dtype == torch.float32
    np.testing.assert_array_equal(count.numpy(), want_n)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-4, atol=1e-5)


def test_classes_absent_from_the_batch_are_unchanged_bit_exact():
    gen = torch.Generator().manual_seed(6)
    count = torch.tensor([3.0, 10.0, 0.0, 7.0], dtype=torch.float64)
    mean, var = torch.randn(4, 3, generator=gen), torch.rand(4, 3, generator=gen)
    feats = torch.randn(6, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([1, 1, IGNORE, 1, IGNORE, 1])
    new_count, new_mean, new_var = pooled_stats_update(count, mean, var, feats, labels)
    assert new_count.tolist() == [3.0, 14.0, 0.0, 7.0]
    for k in (0, 2, 3):
        assert torch.equal(new_mean[k], mean[k]) and torch.equal(new_var[k], var[k])
    assert not new_mean.requires_grad and not new_var.requires_grad


def test_class_moments_and_combine_are_the_parallel_algorithm():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    labels = _labels(gen, 40, 3)
    whole = class_moments(feats, labels, 3)
    parts = combine_pooled_stats(
        *class_moments(feats[:15], labels[:15], 3), *class_moments(feats[15:], labels[15:], 3)
    )
    for got, want in zip(parts, whole, strict=True):
        torch.testing.assert_close(got, want)
    want = _numpy_class_stats(feats.numpy(), labels.numpy(), 3)
    for got, ref in zip(whole, want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)


# ------------------------------------------------------------------------------ pseudo-labels
def test_confident_pseudo_labels_threshold_on_softmax():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.2, 0.0, 0.1], [0.0, 0.0, 9.0]])
    labels, q = confident_pseudo_labels(logits, 0.9)
    assert labels.tolist() == [0, IGNORE, 2]
    torch.testing.assert_close(q, logits.softmax(1).max(1).values)
    img = logits.T.reshape(1, 3, 3, 1)  # [B, C, h, w]: the same pixels as an image
    labels_img, _ = confident_pseudo_labels(img, 0.9)
    assert labels_img.flatten().tolist() == [0, IGNORE, 2]
