"""Probability-masked contrast and pixel-view contrast against plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.losses.contrast import (
    anchor_keep_probs,
    pixel_view_contrast,
    sample_anchor_slots,
    sample_anchors,
    supervised_infonce,
    update_class_freq,
)


# ------------------------------------------------------------------------------- class frequencies
def test_update_class_freq_is_an_ema_of_histogram_fractions() -> None:
    freq = torch.tensor([0.5, 0.5, 0.0])
    labels = torch.tensor([[0, 2, 2], [255, 2, 7]])  # 255 and out-of-range ids ignored
    new = update_class_freq(freq, labels, momentum=0.9)
    torch.testing.assert_close(new, 0.9 * freq + 0.1 * torch.tensor([1 / 4, 0.0, 3 / 4]))
    assert torch.equal(freq, torch.tensor([0.5, 0.5, 0.0]))  # pure
    unchanged = update_class_freq(freq, torch.full((4,), 255), momentum=0.9)
    torch.testing.assert_close(unchanged, freq)


# -------------------------------------------------------------------------------- keep probabilities
def test_anchor_keep_probs_formula() -> None:
    freq = torch.tensor([0.6, 0.3, 0.1, 0.0])  # seen: 0.6, 0.3, 0.1 → median 0.3
    p = anchor_keep_probs(freq, base_rate=0.2, boost=0.5)
    expected = [min(1.0, 0.2 * (0.3 / f) ** 0.5) for f in (0.6, 0.3, 0.1)] + [1.0]
    torch.testing.assert_close(p, torch.tensor(expected))
    torch.testing.assert_close(anchor_keep_probs(freq, 0.2, 0.0), torch.tensor([0.2, 0.2, 0.2, 1.0]))
    torch.testing.assert_close(anchor_keep_probs(torch.zeros(3), 0.2, 1.0), torch.ones(3))


def test_anchor_keep_probs_even_count_uses_lower_median() -> None:
    p = anchor_keep_probs(torch.tensor([0.4, 0.1, 0.3, 0.2]), base_rate=0.1, boost=1.0)
    torch.testing.assert_close(p, torch.tensor([0.1 * 0.2 / 0.4, 0.2, 0.1 * 0.2 / 0.3, 0.1]))


@settings(max_examples=50, deadline=None)
@given(
    freq=st.lists(st.one_of(st.just(0.0), st.floats(1e-12, 1.0)), min_size=1, max_size=12),
    rate=st.floats(1e-3, 1.0),
    boost=st.floats(0.0, 3.0),
)
def test_anchor_keep_probs_are_probabilities(freq: list[float], rate: float, boost: float) -> None:
    f = torch.tensor(freq)
    p = anchor_keep_probs(f, rate, boost)
    assert torch.isfinite(p).all() and (p > 0).all() and (p <= 1).all()
    assert (p[f == 0] == 1).all()
    seen = f > 0
    if boost > 0 and seen.sum() >= 2:  # rarer seen classes are never kept less often
        order = torch.argsort(f[seen])
        ps = p[seen][order]
        assert (ps[1:] <= ps[:-1] + 1e-6).all()


# ---------------------------------------------------------------------------------------- sampling
def test_sample_anchors_keeps_valid_pixels_and_respects_the_cap() -> None:
    labels = torch.tensor([0, 1, 255, 1, 0, 2, 255, 2])
    everything = sample_anchors(labels, torch.ones(3), max_anchors=100)
    assert everything.tolist() == [0, 1, 3, 4, 5, 7]
    assert sample_anchors(labels, torch.zeros(3), max_anchors=100).numel() == 0
    only_1 = sample_anchors(labels, torch.tensor([0.0, 1.0, 0.0]), max_anchors=100)
    assert only_1.tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    capped = sample_anchors(labels, torch.ones(3), max_anchors=4, generator=g)
    assert capped.numel() == 4 and set(capped.tolist()) <= {0, 1, 3, 4, 5, 7}
    assert capped.unique().numel() == 4 and torch.equal(capped, capped.sort().values)


def test_anchor_slots_have_a_static_shape_and_hold_exactly_the_kept_pixels_under_the_cap() -> None:
    labels = torch.randint(0, 4, (300,))
    labels[::7] = 255
    probs = torch.tensor([0.1, 0.9, 0.3, 0.5])
    for seed in range(5):
        kept = sample_anchors(labels, probs, max_anchors=1000, generator=torch.Generator().manual_seed(seed))
        slots, valid = sample_anchor_slots(labels, probs, 1000, generator=torch.Generator().manual_seed(seed))
        assert slots.shape == valid.shape == (300,)  # min(max_anchors, N), whatever was kept
        assert sorted(slots[valid].tolist()) == kept.tolist()  # the same draws: the same anchors
        assert (labels[slots[valid]] != 255).all()
    slots, valid = sample_anchor_slots(labels, torch.zeros(4), 64)
    assert slots.shape == (64,) and not valid.any()  # nothing kept: every slot invalid


def test_anchor_slots_over_the_cap_are_a_uniform_subset_of_the_kept_pixels() -> None:
    labels = torch.zeros(40, dtype=torch.long)
    labels[30:] = 255  # never kept
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(40)
    draws = 2000
    for _ in range(draws):
        slots, valid = sample_anchor_slots(labels, torch.ones(1), 10, generator=g)
        assert slots.shape == (10,) and valid.all()  # 30 kept > 10 slots: all full
        counts[slots] += 1
    assert counts[30:].sum() == 0
    rate = counts[:30] / draws  # each kept pixel in a slot with probability 10/30
    assert torch.allclose(rate, torch.full((30,), 1 / 3), atol=0.05), rate


def test_the_contrast_over_anchor_slots_equals_the_contrast_over_the_kept_anchors() -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(120, 8), dim=1)
    labels = torch.randint(0, 3, (120,))
    probs = torch.tensor([0.5, 0.2, 0.8])
    kept = sample_anchors(labels, probs, 500, generator=torch.Generator().manual_seed(3))
    slots, valid = sample_anchor_slots(labels, probs, 500, generator=torch.Generator().manual_seed(3))
    y_slots = torch.where(valid, labels[slots], torch.full_like(labels[slots], 255))  # as LPCGMA feeds them
    reference = supervised_infonce(z[kept], labels[kept], 0.1)
    assert supervised_infonce(z[slots], y_slots, 0.1) == pytest.approx(float(reference), rel=1e-5)


def test_sample_anchors_keep_rate_follows_the_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (40000,), generator=g)
    idx = sample_anchors(labels, torch.tensor([0.1, 0.5]), max_anchors=10**6, generator=g)
    kept = labels[idx]
    assert (kept == 0).sum().item() / (labels == 0).sum().item() == pytest.approx(0.1, abs=0.01)
    assert (kept == 1).sum().item() / (labels == 1).sum().item() == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------ supervised InfoNCE
def ref_supervised_infonce(z: torch.Tensor, labels: list[int], tau: float) -> float:
    """Plain loops over anchors i, positives p and denominators a ≠ i (ignore 255 everywhere)."""
    n = len(labels)
    idx = [i for i in range(n) if labels[i] != 255]
    sim = [[float(z[i] @ z[j]) / tau for j in range(n)] for i in range(n)]
    losses = []
    for i in idx:
        pos = [p for p in idx if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = math.log(sum(math.exp(sim[i][a]) for a in idx if a != i))
        losses.append(-sum(sim[i][p] - denom for p in pos) / len(pos))
    return sum(losses) / len(losses) if losses else 0.0


def test_supervised_infonce_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    labels = [0, 1, 0, 2, 1, 255, 0, 3, 1, 255, 2, 4]  # 3 and 4 have no positive
    got = supervised_infonce(z, torch.tensor(labels), tau=0.2)
    assert got.item() == pytest.approx(ref_supervised_infonce(z, labels, 0.2), rel=1e-5)


def test_supervised_infonce_without_positives_is_zero_with_graph() -> None:
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_(True)
    for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([255, 255, 1, 255]), torch.tensor([0])):
        zz = z[: labels.numel()]
        loss = supervised_infonce(zz, labels, tau=0.1)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.all(grad == 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 8), classes=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_supervised_infonce_properties(n: int, d: int, classes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    labels = torch.randint(0, classes + 1, (n,), generator=g)
    labels[labels == classes] = 255
    loss = supervised_infonce(z, labels, tau=0.1)
    assert torch.isfinite(loss) and loss.item() >= -1e-5
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    ref = ref_supervised_infonce(z.detach().double(), labels.tolist(), 0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------- pixel-view contrast
def ref_view_contrast(za: torch.Tensor, zb: torch.Tensor, labels: list[int], tau: float) -> float:
    def one(a: torch.Tensor, b: torch.Tensor) -> float:
        n, losses = len(labels), []
        for i in range(n):
            if labels[i] == 255:
                continue
            negs = [j for j in range(n) if labels[j] != 255 and labels[j] != labels[i]]
            if not negs:
                continue
            pos = float(a[i] @ b[i]) / tau
            denom = math.exp(pos) + sum(math.exp(float(a[i] @ b[j]) / tau) for j in negs)
            losses.append(-(pos - math.log(denom)))
        return sum(losses) / len(losses) if losses else 0.0

    return 0.5 * (one(za, zb) + one(zb, za))


def test_pixel_view_contrast_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(1)
    za = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    zb = F.normalize(za + 0.3 * torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    labels = [0, 0, 1, 2, 255, 1, 0, 2, 255, 3]
    got = pixel_view_contrast(za, zb, torch.tensor(labels), tau=0.1)
    assert got.item() == pytest.approx(ref_view_contrast(za, zb, labels, 0.1), rel=1e-5)
    swapped = pixel_view_contrast(zb, za, torch.tensor(labels), tau=0.1)
    assert swapped.item() == pytest.approx(got.item(), rel=1e-6)


def test_pixel_view_contrast_single_class_or_all_ignored_is_zero_with_graph() -> None:
    za = F.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    zb = F.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.full((6,), 255)):
        loss = pixel_view_contrast(za, zb, labels, tau=0.1)
        assert loss.item() == 0.0
        ga, gb = torch.autograd.grad(loss, (za, zb))
        assert torch.all(ga == 0) and torch.all(gb == 0)


def test_pixel_view_contrast_prefers_aligned_views() -> None:
    g = torch.Generator().manual_seed(2)
    za = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (32,), generator=g)
    aligned = pixel_view_contrast(za, za.clone(), labels, tau=0.1)
    shuffled = pixel_view_contrast(za, za[torch.randperm(32, generator=g)], labels, tau=0.1)
    assert aligned < shuffled


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 16), d=st.integers(1, 6), classes=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_pixel_view_contrast_properties(n: int, d: int, classes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    za = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    zb = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    labels = torch.randint(0, classes + 1, (n,), generator=g)
    labels[labels == classes] = 255
    loss = pixel_view_contrast(za, zb, labels, tau=0.1)
    assert torch.isfinite(loss) and loss.item() >= -1e-5
    loss.backward()
    assert za.grad is not None and zb.grad is not None
    assert torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()
    ref = ref_view_contrast(za.detach().double(), zb.detach().double(), labels.tolist(), 0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)
