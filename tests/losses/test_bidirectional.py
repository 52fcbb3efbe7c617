"""BiDA (lpcgma.losses.bidirectional): prototypes, bi-directional contrast, dynamic/hybrid labels."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.losses.bidirectional import (
    calibration_alpha,
    class_prototypes,
    dynamic_pseudo_labels,
    ema_update,
    entropy_loss,
    hybrid_pseudo_labels,
    prototype_contrast_loss,
    released_entropy_loss,
    update_bias,
)

IGNORE = 255
FAST = settings(max_examples=25, deadline=None)


def _labels(gen: torch.Generator, shape: tuple[int, ...], c: int, ignore_frac: float = 0.2) -> torch.Tensor:
    y = torch.randint(0, c, shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < ignore_frac, torch.full_like(y, IGNORE), y)


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = u.norm().item(), v.norm().item()
    return 0.0 if nu < 1e-12 or nv < 1e-12 else (u @ v).item() / (nu * nv)


def _reference_prototypes(feats, labels, c):
    """Loop: mean feature of each class over the pixels [N,D] labelled with it; zeros if absent."""
    protos = torch.zeros(c, feats.shape[1], dtype=torch.float64)
    present = [False] * c
    for k in range(c):
        rows = [f for f, y in zip(feats.double(), labels.tolist(), strict=True) if y == k]
        if rows:
            protos[k] = torch.stack(rows).mean(0)
            present[k] = True
    return protos, torch.tensor(present)


def _reference_contrast(feats, labels, protos, weight, scale, present):
    """Loop: Σ_i w_{y_i}·(−log softmax_k(s·cos(f_i, c_k))_{y_i}) / Σ_i w_{y_i}, absent k excluded."""
    num = den = 0.0
    classes = [k for k in range(len(protos)) if present is None or bool(present[k])]
    for f, y in zip(feats.double(), labels.tolist(), strict=True):
        if y == IGNORE or weight[y].item() == 0:
            continue
        logits = {k: scale * _cos(f, protos[k].double()) for k in classes}
        top = max(logits.values())
        lse = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        num += weight[y].item() * (lse - logits[y])
        den += weight[y].item()
    return num / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------ prototypes
@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 50), d=st.integers(1, 6), c=st.integers(1, 6))
def test_class_prototypes_flat_matches_loop(seed, n, d, c):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = _labels(gen, (n,), c)
    protos, present = class_prototypes(feats, labels, c)
    want, want_present = _reference_prototypes(feats, labels, c)
    torch.testing.assert_close(protos, want)
    assert torch.equal(present, want_present)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    d=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    c=st.integers(1, 5),
)
def test_class_prototypes_per_image_matches_loop(seed, b, d, h, w, c):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    labels = _labels(gen, (b, h, w), c)
    protos, present = class_prototypes(feats, labels, c)
    assert protos.shape == (b, c, d) and present.shape == (b, c)
    flat_protos, flat_present = class_prototypes(feats.flatten(2).transpose(1, 2), labels.flatten(1), c)
    for i in range(b):
        pixels = feats[i].reshape(d, -1).T
        want, want_present = _reference_prototypes(pixels, labels[i].flatten(), c)
        torch.testing.assert_close(protos[i], want)
        torch.testing.assert_close(flat_protos[i], want)
        assert torch.equal(present[i], want_present) and torch.equal(flat_present[i], want_present)


def test_class_prototypes_are_differentiable():
    feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    protos, _ = class_prototypes(feats, labels, 2)
    protos[:, 0].sum().backward()
    torch.testing.assert_close(feats.grad, torch.full_like(feats, 1 / 16))


# ---------------------------------------------------------------------------- contrastive loss
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 30),
    d=st.integers(1, 6),
    c=st.integers(1, 6),
    scale=st.sampled_from([1.0, 10.0]),
    binary=st.booleans(),
    mask_absent=st.booleans(),
)
def test_prototype_contrast_loss_matches_loop(seed, n, d, c, scale, binary, mask_absent):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = _labels(gen, (n,), c)
    protos = torch.randn(c, d, generator=gen, dtype=torch.float64)
    present = torch.rand(c, generator=gen) < 0.7
    protos = protos * present[:, None]  # absent classes: zero prototypes, as class_prototypes gives
    weight = torch.rand(c, generator=gen, dtype=torch.float64)
    weight = (weight < 0.7).double() if binary else weight
    weight = weight * present  # a class without a prototype is never "present in both"
    proto_present = present if mask_absent else None
    got = prototype_contrast_loss(feats, labels, protos, weight, scale, proto_present)
    want = _reference_contrast(feats, labels, protos, weight, scale, proto_present)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_prototype_contrast_loss_batched_equals_per_image_pooled():
    gen = torch.Generator().manual_seed(1)
    b, n, d, c = 3, 20, 5, 4
    feats = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    labels = _labels(gen, (b, n), c)
    protos = torch.randn(b, c, d, generator=gen, dtype=torch.float64)
    weight = (torch.rand(b, c, generator=gen) < 0.7).double()
    got = prototype_contrast_loss(feats, labels, protos, weight)
    num = den = 0.0
    for i in range(b):
        wi = weight[i][labels[i].clamp(max=c - 1)] * (labels[i] != IGNORE)
        num += _reference_contrast(feats[i], labels[i], protos[i], weight[i], 10.0, None) * wi.sum().item()
        den += wi.sum().item()
    assert got.item() == pytest.approx(num / den, rel=1e-9)
    # [B,D,h,w] features are flattened the same way
    img = feats.transpose(1, 2).reshape(b, d, 4, 5)
    got_img = prototype_contrast_loss(img, labels.reshape(b, 4, 5), protos, weight)
    assert got_img.item() == pytest.approx(got.item(), rel=1e-12)


def test_forward_and_backward_contrast_are_the_same_function():
    """FCL: target pixels vs source prototypes; BCL: source pixels vs target prototypes."""
    gen = torch.Generator().manual_seed(2)
    c = 4
    f_s = torch.randn(1, 8, 6, 6, generator=gen, requires_grad=True)
    f_t = torch.randn(1, 8, 6, 6, generator=gen, requires_grad=True)
    y_s, y_t = _labels(gen, (1, 6, 6), c), _labels(gen, (1, 6, 6), c)
    protos_s, present_s = class_prototypes(f_s.detach(), y_s, c)
    protos_t, present_t = class_prototypes(f_t.detach(), y_t, c)
    both = (present_s & present_t).float()
    fcl = prototype_contrast_loss(f_t, y_t, protos_s, both)
    bcl = prototype_contrast_loss(f_s, y_s, protos_t, both)
    (fcl + bcl).backward()
    assert torch.isfinite(fcl) and torch.isfinite(bcl) and fcl > 0 and bcl > 0
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is not None and f_t.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_absent", [False, True])
def test_no_class_present_in_both_gives_zero_loss_with_grad(mask_absent):
    feats = torch.randn(2, 8, 3, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8))
    protos = torch.zeros(2, 3, 3)  # no prototype at all
    present = torch.zeros(2, 3, dtype=torch.bool)
    loss = prototype_contrast_loss(
        feats, labels, protos, torch.zeros(2, 3), 10.0, present if mask_absent else None
    )
    loss.backward()
    assert loss.item() == 0.0
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and torch.all(feats.grad == 0)


def test_zero_features_and_prototypes_give_finite_gradients():
    feats = torch.zeros(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, IGNORE, 1])
    protos = torch.zeros(3, 4)
    loss = prototype_contrast_loss(
        feats, labels, protos, torch.ones(3), 10.0, torch.tensor([True, True, False])
    )
    loss.backward()
    assert feats.grad is not None and torch.isfinite(loss) and torch.isfinite(feats.grad).all()


# ------------------------------------------------------------------------- dynamic pseudo-labels
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 30),
    d=st.integers(1, 5),
    c=st.integers(1, 5),
    threshold=st.sampled_from([0.0, 0.5, 0.8]),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    use_bias=st.booleans(),
)
def test_dynamic_pseudo_labels_match_loop(seed, n, d, c, threshold, alpha, use_bias):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    protos = torch.randn(c, d, generator=gen, dtype=torch.float64)
    present = torch.rand(c, generator=gen) < 0.7
    bias = torch.randn(c, d, generator=gen, dtype=torch.float64) if use_bias else None
    labels, conf = dynamic_pseudo_labels(feats, protos, present, 10.0, threshold, bias, alpha)
    classes = [k for k in range(c) if present[k]]
    for i in range(n):
        if not classes:
            assert labels[i].item() == IGNORE and conf[i].item() == 0.0
            continue
        centre = {k: protos[k] + (alpha * bias[k] if bias is not None else 0) for k in classes}
        logits = {k: 10.0 * _cos(feats[i], centre[k]) for k in classes}
        z = sum(math.exp(v) for v in logits.values())
        best = max(classes, key=lambda k: logits[k])
        q = math.exp(logits[best]) / z
        assert conf[i].item() == pytest.approx(q, rel=1e-9)
        if q >= threshold + 1e-9:
            assert labels[i].item() == best
        elif q < threshold - 1e-9:
            assert labels[i].item() == IGNORE


def test_dynamic_pseudo_labels_calibration_moves_source_prototypes():
    """A target pixel at c_s + b is labelled k once α = 1 even if c_s alone points elsewhere."""
    protos_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    bias = torch.tensor([[-1.0, 1.0], [0.0, 0.0]])  # class 0 sits at (0, 1) in the target domain
    feats_t = torch.tensor([[0.0, 1.0]])
    present = torch.tensor([True, True])
    before, _ = dynamic_pseudo_labels(feats_t, protos_s, present, 10.0, 0.0, bias, alpha=0.0)
    after, _ = dynamic_pseudo_labels(feats_t, protos_s, present, 10.0, 0.0, bias, alpha=0.9)
    assert before.tolist() == [1] and after.tolist() == [0]


def test_dynamic_pseudo_labels_image_and_batched_shapes_and_detached():
    feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    protos = torch.randn(2, 5, 3)
    present = torch.ones(2, 5, dtype=torch.bool)
    labels, conf = dynamic_pseudo_labels(feats, protos, present, threshold=0.0)
    assert labels.shape == (2, 16) and conf.shape == (2, 16)
    assert not conf.requires_grad
    for i in range(2):
        want, _ = dynamic_pseudo_labels(feats[i].reshape(3, -1).T, protos[i], present[i], threshold=0.0)
        assert torch.equal(labels[i], want)


# -------------------------------------------------------------------------- hybrid pseudo-labels
def _reference_hybrid(s, sc, d, dc, rule):
    out = []
    for a, qa, b, qb in zip(s.tolist(), sc.tolist(), d.tolist(), dc.tolist(), strict=True):
        if rule == "agree":
            out.append(a if a != IGNORE and a == b else IGNORE)
        elif a == IGNORE:
            out.append(b)
        elif b == IGNORE:
            out.append(a)
        else:
            out.append(b if qb > qa else a)
    return out


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 40), rule=st.sampled_from(["agree", "confident"]))
def test_hybrid_pseudo_labels_match_loop(seed, n, rule):
    gen = torch.Generator().manual_seed(seed)
    static, dynamic = _labels(gen, (n,), 3, 0.3), _labels(gen, (n,), 3, 0.3)
    sc, dc = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    got = hybrid_pseudo_labels(static, sc, dynamic, dc, rule)
    assert got.tolist() == _reference_hybrid(static, sc, dynamic, dc, rule)


def test_hybrid_pseudo_labels_rejects_unknown_rule():
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="agree"):
        hybrid_pseudo_labels(y, y.float(), y, y.float(), "union")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- calibration
def test_update_bias_is_ema_of_prototype_difference_for_shared_classes():
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(3, 2, generator=gen)
    protos_t, protos_s = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    both = torch.tensor([True, False, True])
    new = update_bias(bias, protos_t, protos_s, both, momentum=0.9)
    for k in range(3):
        want = 0.9 * bias[k] + 0.1 * (protos_t[k] - protos_s[k]) if both[k] else bias[k]
        torch.testing.assert_close(new[k], want)
    assert torch.equal(new[1], bias[1])


def test_update_bias_per_image_averages_over_images_with_both():
    bias = torch.zeros(2, 1)
    protos_t = torch.tensor([[[1.0], [5.0]], [[3.0], [7.0]]])  # [B=2, C=2, D=1]
    protos_s = torch.zeros(2, 2, 1)
    both = torch.tensor([[True, False], [True, False]])
    new = update_bias(bias, protos_t, protos_s, both, momentum=0.5)
    assert new.flatten().tolist() == [1.0, 0.0]  # 0.5·0 + 0.5·mean(1, 3); class 1 unchanged


def test_update_bias_and_ema_are_detached():
    protos_t = torch.randn(2, 3, requires_grad=True)
    new = update_bias(torch.zeros(2, 3), protos_t, torch.zeros(2, 3), torch.tensor([True, True]))
    assert not new.requires_grad
    state = ema_update(torch.ones(2, 3), protos_t, torch.tensor([True, False]), 0.0)
    assert torch.equal(state[0], protos_t[0].detach()) and torch.equal(state[1], torch.ones(3))


def test_calibration_alpha_ramps_from_zero_to_one():
    assert calibration_alpha(0, 100) == 0.0
    assert calibration_alpha(25, 100) == 0.25
    assert calibration_alpha(100, 100) == 1.0
    assert calibration_alpha(150, 100) == 1.0
    assert calibration_alpha(-5, 100) == 0.0
    assert calibration_alpha(3, 0) == 1.0


# ------------------------------------------------------------------------------------- entropy
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 2),
    c=st.integers(2, 5),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
)
def test_entropy_loss_matches_loop(seed, b, c, h, w):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                p = logits[i, :, y, x].softmax(0).tolist()
                total += -sum(q * math.log(q) for q in p if q > 0) / math.log(c)
    assert entropy_loss(logits).item() == pytest.approx(total / (b * h * w), rel=1e-5, abs=1e-6)


def test_entropy_loss_bounds_and_gradient():
    assert entropy_loss(torch.zeros(1, 4, 2, 2)).item() == pytest.approx(1.0)
    peaked = torch.full((1, 4, 2, 2), -100.0)
    peaked[:, 1] = 100.0
    assert entropy_loss(peaked).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    entropy_loss(logits).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pixels_of_a_class_without_prototype_are_dropped_when_masking():
    feats = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    protos = torch.stack([torch.randn(3), torch.zeros(3)])
    present = torch.tensor([True, False])
    masked = prototype_contrast_loss(feats, labels, protos, torch.ones(2), 10.0, present)
    only_0 = prototype_contrast_loss(feats[:2], labels[:2], protos, torch.ones(2), 10.0, present)
    assert torch.isfinite(masked) and masked.item() == pytest.approx(only_0.item())
    assert only_0.item() == pytest.approx(0.0, abs=1e-6)  # a single competing class: softmax is 1


# ------------------------------------------------- the released code's choices (issue 24), by hand
@pytest.mark.parametrize(
    ("present", "absent", "logits"),
    [
        (None, "drop", [10.0, 0.0, 0.0]),  # zero prototype kept: cosine 0
        ([True, False, True], "drop", [10.0, None, 0.0]),  # dropped from the softmax
        ([True, False, True], "negative", [10.0, -10.0, 0.0]),  # cosine −1 (released code)
    ],
)
def test_absent_prototype_rules_by_hand(present, absent, logits):
    """One pixel f = e1 of class 0; prototypes e1 (cos 1), absent (zero), e2 (cos 0); scale 10."""
    feats = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    protos = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mask = None if present is None else torch.tensor(present)
    got = prototype_contrast_loss(feats, torch.tensor([0]), protos, weight, 10.0, mask, absent)
    want = -10.0 + math.log(sum(math.exp(v) for v in logits if v is not None))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_absent_prototype_rule_must_be_known():
    with pytest.raises(ValueError, match="'drop' or 'negative'"):
        prototype_contrast_loss(torch.ones(1, 2), torch.tensor([0]), torch.ones(2, 2), torch.ones(2), 10.0,
                                torch.tensor([True, False]), "minus")  # type: ignore[arg-type]


def test_undetached_prototypes_pass_the_gradient_to_the_features_they_average():
    """FCL with a source prototype c_0 = mean of two source pixels (the released code): each of them
    gets (1/2)·∂L/∂c_0, where for L = −log softmax_k(s·cos(f, c_k))_y
    ∂L/∂c_k = s·(p_k − 1[k = y])·(f̂ − cos(f, c_k)·ĉ_k)/‖c_k‖."""
    s = 10.0
    f_t = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # one target pixel of class 0
    f_s = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y_s = torch.tensor([0, 0, 1])
    protos, _ = class_prototypes(f_s, y_s, 2)  # c_0 = (1, 1), c_1 = (0, 1), with their graph
    loss = prototype_contrast_loss(f_t, torch.tensor([0]), protos, torch.ones(2, dtype=torch.float64), s)
    loss.backward()
    c = [torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]
    f_hat = f_t[0] / f_t[0].norm()
    cos = [float(f_hat @ (ck / ck.norm())) for ck in c]
    p = torch.tensor([s * v for v in cos], dtype=torch.float64).softmax(0).tolist()
    grad_c = [s * (p[k] - (k == 0)) * (f_hat - cos[k] * c[k] / c[k].norm()) / c[k].norm() for k in range(2)]
    want = torch.stack([grad_c[0] / 2, grad_c[0] / 2, grad_c[1]])
    assert f_s.grad is not None
    torch.testing.assert_close(f_s.grad, want, rtol=1e-10, atol=1e-12)
    # detached prototypes (this project's default): no gradient reaches the source features
    f_s.grad = None
    protos, _ = class_prototypes(f_s, y_s, 2)
    prototype_contrast_loss(f_t, torch.tensor([0]), protos.detach(), torch.ones(2, dtype=torch.float64), s)
    assert f_s.grad is None


def test_released_entropy_is_log_softmax_of_the_softmax():
    """Confident 2-class logits: p = (1, 0), q = softmax(p) = (e, 1)/(e + 1), H = log(1 + 1/e); at
    uniform logits p = (½, ½), q = (½, ½), H = log 2: near log C either way (the flattening)."""
    confident = torch.tensor([60.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    assert released_entropy_loss(confident).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    uniform = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    assert released_entropy_loss(uniform).item() == pytest.approx(math.log(2), rel=1e-12)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    p = logits.softmax(1)
    q = p.exp() / p.exp().sum(1, keepdim=True)
    want = -(p * q.log()).sum(1).mean()
    assert released_entropy_loss(logits).item() == pytest.approx(want.item(), rel=1e-12)


def test_static_hybrid_rule_keeps_the_classifier_labels():
    static = torch.tensor([0, 1, 2, IGNORE])
    dynamic = torch.tensor([1, 1, IGNORE, 0])
    conf = torch.tensor([0.9, 0.5, 0.2, 0.1])
    torch.testing.assert_close(hybrid_pseudo_labels(static, conf, dynamic, conf, "static"), static)
