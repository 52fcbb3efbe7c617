"""Gaussian multiprototypes: densities vs plain loops, forward alignment, batched EM vs sklearn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture

from lpcgma.losses.gmm import (
    NEG_SCORE,
    GMMParams,
    batched_em,
    class_scores,
    component_log_prob,
    forward_alignment_loss,
    gmm_mean_log_likelihood,
)


def random_params(
    c: int, k: int, d: int, seed: int = 0, inactive: tuple[tuple[int, int], ...] = ()
) -> GMMParams:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, k, d, generator=g, dtype=torch.float64)
    variances = 0.2 + torch.rand(c, k, d, generator=g, dtype=torch.float64)
    active = torch.ones(c, k, dtype=torch.bool)
    for ci, ki in inactive:
        active[ci, ki] = False
    w = torch.rand(c, k, generator=g, dtype=torch.float64) * active
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    log_w = torch.where(active, w.clamp_min(1e-300).log(), torch.full_like(w, float("-inf")))
    return GMMParams(means, variances, log_w, active)


def ref_component_log_prob(z: torch.Tensor, p: GMMParams) -> list[list[list[float]]]:
    """Plain loops: log π + Σ_d log N(z_d; μ_d, σ²_d)."""
    c, k, d = p.means.shape
    out = []
    for n in range(z.shape[0]):
        row = []
        for ci in range(c):
            comps = []
            for ki in range(k):
                if not bool(p.active[ci, ki]):
                    comps.append(float("-inf"))
                    continue
                total = float(p.log_weights[ci, ki])
                for di in range(d):
                    mu, var, x = float(p.means[ci, ki, di]), float(p.variances[ci, ki, di]), float(z[n, di])
                    total += -0.5 * math.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)
                comps.append(total)
            row.append(comps)
        out.append(row)
    return out


def logsumexp(xs: list[float]) -> float:
    finite = [x for x in xs if x != float("-inf")]
    if not finite:
        return float("-inf")
    m = max(finite)
    return m + math.log(sum(math.exp(x - m) for x in finite))


# ------------------------------------------------------------------------------------- densities
def test_component_log_prob_matches_loop_reference() -> None:
    p = random_params(3, 2, 4, inactive=((1, 1),))
    z = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = component_log_prob(z, p)
    ref = torch.tensor(ref_component_log_prob(z, p), dtype=torch.float64)
    assert got.shape == (5, 3, 2)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-9, atol=1e-9)
    scores = class_scores(z, p)
    ref_scores = torch.tensor(
        [[logsumexp(ref[n, ci].tolist()) for ci in range(3)] for n in range(5)], dtype=torch.float64
    )
    torch.testing.assert_close(scores, ref_scores, rtol=1e-9, atol=1e-9)


def test_class_scores_of_class_without_components_is_finite_with_zero_grad() -> None:
    p = random_params(3, 2, 4, inactive=((2, 0), (2, 1)))
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    s = class_scores(z, p)
    assert torch.all(s[:, 2] == NEG_SCORE)
    assert torch.isfinite(s).all()
    s.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------- forward alignment
def ref_forward_loss(z, y, q, p, tau, threshold, weighting) -> float:  # type: ignore[no-untyped-def]
    lp = ref_component_log_prob(z, p)
    c = p.means.shape[0]
    total, count = 0.0, 0
    for n in range(z.shape[0]):
        yi, qi = int(y[n]), float(q[n])
        if yi == 255 or qi < threshold or not bool(p.active[yi].any()):
            continue
        scores = [logsumexp(lp[n][ci]) if bool(p.active[ci].any()) else NEG_SCORE for ci in range(c)]
        logits = [s / tau for s in scores]
        ce = logsumexp(logits) - logits[yi]
        total += ce * (qi if weighting else 1.0)
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("weighting", [True, False])
def test_forward_alignment_matches_reference(weighting: bool) -> None:
    p = random_params(4, 3, 3, inactive=((3, 0), (3, 1), (3, 2), (0, 2)))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    y[:3] = 255
    q = torch.rand(20, generator=g, dtype=torch.float64)
    got = forward_alignment_loss(z, y, q, p, tau=0.7, threshold=0.3, confidence_weighting=weighting)
    ref = ref_forward_loss(z, y, q, p, 0.7, 0.3, weighting)
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_forward_alignment_is_zero_with_graph_when_nothing_qualifies() -> None:
    p = random_params(2, 2, 3)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([255, 0, 1, 255, 0])
    q = torch.full((5,), 0.5, dtype=torch.float64)
    loss = forward_alignment_loss(z, y, q, p, tau=1.0, threshold=0.9, confidence_weighting=True)
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)


def test_forward_alignment_step_pulls_features_toward_their_class_components() -> None:
    """One SGD step on leaf target features lowers their distance to their class's nearest component."""
    c, k, d = 3, 2, 4
    g = torch.Generator().manual_seed(0)
    means = 3.0 * torch.randn(c, k, d, generator=g)
    p = GMMParams(
        means, torch.ones(c, k, d), torch.full((c, k), math.log(0.5)), torch.ones(c, k, dtype=torch.bool)
    )
    y = torch.randint(0, c, (200,), generator=g)
    comp = torch.randint(0, k, (200,), generator=g)
    z0 = means[y, comp] + 1.0 * torch.randn(200, d, generator=g)
    z = z0.clone().requires_grad_(True)
    loss = forward_alignment_loss(z, y, torch.ones(200), p, tau=1.0, threshold=0.9, confidence_weighting=True)
    loss.backward()
    assert z.grad is not None
    z1 = (z - 0.5 * z.grad).detach()

    def nearest(x: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] - means[y]).norm(dim=-1).min(-1).values

    before, after = nearest(z0), nearest(z1)
    assert after.mean() < before.mean()
    moved = (z1 - z0).norm(dim=-1) > 1e-6
    assert ((after < before) | ~moved).float().mean() > 0.9
    # and the class score of the true class rises relative to the others
    margin0 = class_scores(z0, p).log_softmax(-1).gather(1, y[:, None]).mean()
    margin1 = class_scores(z1, p).log_softmax(-1).gather(1, y[:, None]).mean()
    assert margin1 > margin0


# ------------------------------------------------------------------------------------ batched EM
def planted(
    c: int, m: int, d: int, k: int, sep: float, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(c, k, d, generator=g, dtype=torch.float64)
    comp = torch.randint(0, k, (c, m), generator=g)
    x = centres.gather(1, comp[..., None].expand(c, m, d)) + noise * torch.randn(
        c, m, d, generator=g, dtype=torch.float64
    )
    return x, centres


def sklearn_fit(x: np.ndarray, k: int, **kw: object) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(k, covariance_type="diag", reg_covar=1e-6, **kw).fit(x)  # type: ignore[arg-type]


def test_batched_em_matches_sklearn_from_the_same_init() -> None:
    c, m, d, k = 3, 400, 5, 3
    x, _ = planted(c, m, d, k, sep=1.0, noise=0.7, seed=1)
    valid = torch.ones(c, m, dtype=torch.bool)
    init = batched_em(x, valid, k, 0, 1e-6, generator=torch.Generator().manual_seed(0))
    ours = batched_em(x, valid, k, 300, 1e-6, init=init)
    ll = gmm_mean_log_likelihood(x, valid, ours)
    for ci in range(c):
        gm = sklearn_fit(
            x[ci].numpy(),
            k,
            max_iter=300,
            tol=0.0,
            means_init=init.means[ci].numpy(),
            weights_init=init.log_weights[ci].exp().numpy(),
            precisions_init=(1.0 / init.variances[ci]).numpy(),
        )
        assert ll[ci].item() == pytest.approx(gm.score(x[ci].numpy()), rel=1e-6)
        np.testing.assert_allclose(ours.means[ci].numpy(), gm.means_, atol=1e-5)


def test_batched_em_log_likelihood_within_1pct_of_sklearn_independent_inits() -> None:
    c, m, d, k = 4, 600, 6, 3
    x, _ = planted(c, m, d, k, sep=2.0, noise=0.5, seed=2)
    x = x.float()
    valid = torch.ones(c, m, dtype=torch.bool)
    ours = batched_em(x, valid, k, 100, 1e-6, generator=torch.Generator().manual_seed(0))
    ll = gmm_mean_log_likelihood(x, valid, ours)
    for ci in range(c):
        gm = sklearn_fit(
            x[ci].double().numpy(), k, init_params="k-means++", max_iter=500, tol=1e-8, random_state=0
        )
        ref = gm.score(x[ci].double().numpy())
        assert abs(ll[ci].item() - ref) / abs(ref) < 0.01


def test_batched_em_recovers_planted_components() -> None:
    c, m, d, k = 3, 900, 8, 3
    x, centres = planted(c, m, d, k, sep=4.0, noise=0.2, seed=5)
    valid = torch.ones(c, m, dtype=torch.bool)
    p = batched_em(x.float(), valid, k, 30, 1e-4, generator=torch.Generator().manual_seed(0))
    assert p.active.all()
    for ci in range(c):
        dist = (centres[ci][:, None, :].float() - p.means[ci][None]).norm(dim=-1)  # planted × fitted
        assert dist.min(1).values.max() < 0.1  # every planted centre found
        assert dist.min(0).values.max() < 0.1  # every component on a planted centre
        torch.testing.assert_close(p.variances[ci], torch.full((k, d), 0.04), atol=0.015, rtol=0)
    torch.testing.assert_close(p.log_weights.exp().sum(-1), torch.ones(c))


def test_batched_em_degenerate_classes_never_nan() -> None:
    c, m, d, k = 5, 40, 3, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c, m, d, generator=g)
    valid = torch.zeros(c, m, dtype=torch.bool)
    valid[0, :2] = True  # fewer samples than K
    valid[1] = True
    x[1] = x[1, :1]  # every sample identical
    valid[2, :30] = True
    x[2, 10:30] = x[2, :10].repeat(2, 1)  # duplicated points (10 distinct)
    # class 3: empty
    valid[4] = True  # ordinary
    for init in (None, "warm"):
        p0 = batched_em(x, valid, k, 3, 1e-4, generator=torch.Generator().manual_seed(1))
        p = p0 if init is None else batched_em(x, valid, k, 5, 1e-4, init=p0)
        assert p.active.sum(-1).tolist() == [2, 4, 4, 0, 4]
        for t in (p.means, p.variances):
            assert torch.isfinite(t).all()
        assert (p.variances >= 1e-4).all()
        assert torch.isfinite(p.log_weights[p.active]).all()
        assert torch.isneginf(p.log_weights[~p.active]).all()
        torch.testing.assert_close(p.log_weights.exp().sum(-1), torch.tensor([1.0, 1, 1, 0, 1]))
        ll = gmm_mean_log_likelihood(x, valid, p)
        assert torch.isfinite(ll).all() and ll[3] == 0
        z = torch.randn(7, d, requires_grad=True)
        loss = forward_alignment_loss(
            z, torch.tensor([0, 1, 2, 3, 4, 255, 3]), torch.ones(7), p, 1.0, 0.5, True
        )
        loss.backward()
        assert torch.isfinite(loss) and z.grad is not None and torch.isfinite(z.grad).all()


def test_batched_em_log_likelihood_never_decreases() -> None:
    x, _ = planted(2, 300, 4, 3, sep=1.0, noise=0.8, seed=7)
    valid = torch.ones(2, 300, dtype=torch.bool)
    p = batched_em(x, valid, 3, 0, 1e-3, generator=torch.Generator().manual_seed(0))
    prev = gmm_mean_log_likelihood(x, valid, p)
    for _ in range(10):
        p = batched_em(x, valid, 3, 1, 1e-3, init=p)
        ll = gmm_mean_log_likelihood(x, valid, p)
        assert (ll >= prev - 1e-9).all()
        prev = ll


def test_gmm_mean_log_likelihood_matches_component_log_prob() -> None:
    x, _ = planted(3, 50, 4, 2, sep=1.0, noise=0.5, seed=3)
    valid = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) < 0.7
    p = batched_em(x, valid, 2, 5, 1e-4, generator=torch.Generator().manual_seed(0))
    got = gmm_mean_log_likelihood(x, valid, p)
    for ci in range(3):
        s = component_log_prob(x[ci][valid[ci]], p)[:, ci].logsumexp(-1).mean()
        torch.testing.assert_close(got[ci], s)


# ---------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    c=st.integers(1, 4),
    m=st.integers(1, 25),
    d=st.integers(1, 5),
    k=st.integers(1, 5),
    iters=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    frac=st.floats(0.0, 1.0),
)
def test_batched_em_properties(c: int, m: int, d: int, k: int, iters: int, seed: int, frac: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, m, d, generator=g)
    valid = torch.rand(c, m, generator=g) < frac
    p = batched_em(x, valid, k, iters, 1e-3, generator=g)
    n = valid.sum(1)
    assert p.active.sum(-1).tolist() == n.clamp(max=k).tolist()
    assert torch.isfinite(p.means).all() and torch.isfinite(p.variances).all()
    assert (p.variances >= 1e-3).all()
    torch.testing.assert_close(p.log_weights.exp().sum(-1), (n > 0).float())
    assert torch.isfinite(gmm_mean_log_likelihood(x, valid, p)).all()
    z = torch.randn(6, d, generator=g)
    lp = component_log_prob(z, p)
    assert not torch.isnan(lp).any()
    s = class_scores(z, p)
    assert torch.isfinite(s).all()
    has = p.active.any(-1)
    torch.testing.assert_close(s[:, has], lp[:, has].logsumexp(-1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    k=st.integers(1, 3),
    d=st.integers(1, 3),
    seed=st.integers(0, 999),
)
def test_component_log_prob_property_vs_loops(n: int, c: int, k: int, d: int, seed: int) -> None:
    p = random_params(c, k, d, seed=seed, inactive=((0, 0),) if k > 1 else ())
    z = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = component_log_prob(z, p)
    ref = torch.tensor(ref_component_log_prob(z, p), dtype=torch.float64)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-9, atol=1e-9)
