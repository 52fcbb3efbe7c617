"""Label-free model-selection criteria: the right ranking on constructed cases, plain-loop references, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.engine.label_free import (
    CRITERIA,
    TARGET_LABEL_FREE,
    argmax_agreement,
    best_of,
    find_criterion,
    information_maximisation,
    is_better,
    label_free_metrics,
    mean_entropy,
    resolve_objective,
    soft_neighbourhood_density,
    subsample,
)


def _one_hot(labels: list[int], c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), c).float()


def _random_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    logits = rng.normal(0.0, 3.0, (n, c))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ------------------------------------------------------------------------- plain-loop references
def _ref_entropy(row: np.ndarray) -> float:
    return -sum(float(p) * math.log(p) for p in row if p > 0)


def _ref_mean_entropy(probs: np.ndarray) -> float:
    return sum(_ref_entropy(r) for r in probs) / len(probs)


def _ref_im(probs: np.ndarray) -> float:
    n, c = probs.shape
    marginal = [sum(probs[i, k] for i in range(n)) / n for k in range(c)]
    return _ref_mean_entropy(probs) - _ref_entropy(np.array(marginal))


def _ref_snd(features: np.ndarray, temperature: float) -> float:
    n = len(features)
    norms = [math.sqrt(sum(v * v for v in f)) for f in features]
    total = 0.0
    for i in range(n):
        logits = [
            sum(a * b for a, b in zip(features[i], features[j], strict=True)) / (norms[i] * norms[j]) / temperature
            for j in range(n)
            if j != i
        ]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        z = sum(weights)
        total += _ref_entropy(np.array([w / z for w in weights]))
    return total / n


def _ref_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(a, b, strict=True)) / len(a)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(2, 7))
def test_entropy_and_im_match_a_plain_loop(seed: int, n: int, c: int) -> None:
    probs = _random_probs(np.random.default_rng(seed), n, c)
    t = torch.from_numpy(probs).float()
    assert float(mean_entropy(t)) == pytest.approx(_ref_mean_entropy(probs), abs=1e-5)
    assert float(information_maximisation(t)) == pytest.approx(_ref_im(probs), abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30), st.integers(2, 9), st.sampled_from([0.05, 0.5, 1.0]))
def test_snd_matches_a_plain_loop(seed: int, n: int, d: int, temperature: float) -> None:
    features = np.random.default_rng(seed).normal(size=(n, d))
    got = soft_neighbourhood_density(torch.from_numpy(features).float(), temperature)
    assert float(got) == pytest.approx(_ref_snd(features, temperature), rel=1e-3, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50), st.integers(2, 7))
def test_agreement_matches_a_plain_loop(seed: int, n: int, c: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _random_probs(rng, n, c), _random_probs(rng, n, c)
    got = argmax_agreement(torch.from_numpy(a), torch.from_numpy(b))
    assert float(got) == pytest.approx(_ref_agreement(a, b))


# ------------------------------------------------------------------------- the right ranking
def test_entropy_ranks_confident_below_uniform() -> None:
    c = 5
    confident = _one_hot([0, 1, 2, 3, 4, 0], c) * 0.96 + 0.01
    uniform = torch.full((6, c), 1 / c)
    assert float(mean_entropy(_one_hot([0, 3], c))) == 0.0
    assert float(mean_entropy(uniform)) == pytest.approx(math.log(c))
    assert mean_entropy(confident) < mean_entropy(uniform)


def test_im_prefers_diverse_over_collapsed_confident_predictions() -> None:
    c = 4
    diverse = _one_hot([0, 1, 2, 3] * 5, c)
    collapsed = _one_hot([2] * 20, c)
    uniform = torch.full((20, c), 1 / c)
    assert float(information_maximisation(diverse)) == pytest.approx(-math.log(c))  # the minimum
    assert float(information_maximisation(collapsed)) == pytest.approx(0.0)
    assert float(information_maximisation(uniform)) == pytest.approx(0.0, abs=1e-6)
    # entropy alone cannot tell a collapse from a good model; IM can
    assert mean_entropy(diverse) == mean_entropy(collapsed)
    assert information_maximisation(diverse) < information_maximisation(collapsed)


def test_snd_ranks_clustered_embeddings_above_random_ones() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    clustered = centres.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 16, generator=g)
    scattered = torch.randn(200, 16, generator=g)
    assert soft_neighbourhood_density(clustered) > soft_neighbourhood_density(scattered) + 1.0
    # identical features: every other row is an equally likely neighbour → log(N − 1)
    assert float(soft_neighbourhood_density(torch.ones(10, 3))) == pytest.approx(math.log(9), abs=1e-5)


def test_agreement_of_identical_and_permuted_predictions() -> None:
    probs = torch.softmax(torch.randn(100, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    shifted = probs[:, torch.tensor([1, 2, 3, 4, 5, 0])]  # every argmax moves to another class
    assert float(argmax_agreement(probs, probs)) == 1.0
    assert float(argmax_agreement(probs, shifted)) == 0.0


def test_bad_inputs_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="expected \\[N, D\\] with N >= 2"):
        soft_neighbourhood_density(torch.ones(1, 4))
    with pytest.raises(ValueError, match="temperature = 0.0 is invalid: expected > 0"):
        soft_neighbourhood_density(torch.ones(3, 4), 0.0)
    with pytest.raises(ValueError, match="expected equal"):
        argmax_agreement(torch.ones(3, 4), torch.ones(2, 4))


# ------------------------------------------------------------------------- registry and bundle
def test_registry_modes() -> None:
    assert CRITERIA["target_miou"] == ("target_miou", "max")
    assert CRITERIA["source_miou"] == ("source_miou", "max")
    assert {n: CRITERIA[n].mode for n in TARGET_LABEL_FREE} == {
        "entropy": "min",
        "im": "min",
        "snd": "max",
        "snd_embed": "max",
        "agreement": "max",
        "flip_agreement": "max",
    }
    assert len({c.metric for c in CRITERIA.values()}) == len(CRITERIA)


@pytest.mark.parametrize(
    ("objective", "mode", "expected"),
    [
        ("snd", None, ("target_snd", "max")),
        ("entropy", None, ("target_entropy", "min")),
        ("target_entropy", None, ("target_entropy", "min")),  # a metric key finds its criterion too
        ("im", "max", ("target_im", "max")),  # an explicit mode wins
        ("diag/gmm_src_loglik", None, ("diag/gmm_src_loglik", "max")),  # unknown keys: max
        ("loss/total", "min", ("loss/total", "min")),
    ],
)
def test_resolve_objective(objective: str, mode: str | None, expected: tuple[str, str]) -> None:
    assert resolve_objective(objective, mode) == expected


def test_resolve_objective_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="mode = 'up' is invalid: expected 'max' or 'min'"):
        resolve_objective("snd", "up")
    with pytest.raises(ValueError, match="objective is empty"):
        resolve_objective("")
    assert find_criterion("nope") is None


def test_label_free_metrics_bundle() -> None:
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(300, 5, generator=g), 1)
    embed = torch.randn(300, 8, generator=g)
    out = label_free_metrics(probs, embed, teacher_probs=probs, flip_probs=probs.flip(0), snd_pixels=64, seed=3)
    assert set(out) == {CRITERIA[n].metric for n in TARGET_LABEL_FREE}
    idx = subsample(300, 64, 3)
    assert out["target_snd"] == pytest.approx(float(soft_neighbourhood_density(probs[idx])))
    assert out["target_snd_embed"] == pytest.approx(float(soft_neighbourhood_density(embed[idx])))
    assert out["target_agreement"] == 1.0
    no_teacher = label_free_metrics(probs, embed, snd_pixels=64)
    assert "target_agreement" not in no_teacher and "target_flip_agreement" not in no_teacher


def test_subsample_is_fixed_distinct_and_sorted() -> None:
    a, b = subsample(1000, 10, 5), subsample(1000, 10, 5)
    assert torch.equal(a, b) and len(set(a.tolist())) == 10 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, subsample(1000, 10, 6))
    assert subsample(4, 10, 0).tolist() == [0, 1, 2, 3]


def test_is_better_follows_the_mode_and_nan_never_wins() -> None:
    assert is_better(0.5, 0.4, "max") and not is_better(0.4, 0.5, "max") and not is_better(0.5, 0.5, "max")
    assert is_better(0.4, 0.5, "min") and not is_better(0.5, 0.4, "min")
    assert not is_better(math.nan, 0.1, "max") and not is_better(math.nan, 0.1, "min")
    assert is_better(0.1, -math.inf, "max") and is_better(0.1, math.inf, "min")  # the trainer's starting points


def test_best_of_picks_by_mode_and_key() -> None:
    assert best_of([(0.2, 3), (0.7, 1), (0.5, 2)], "max") == (0.7, 1)
    assert best_of([(0.2, 3), (0.7, 1), (0.5, 2)], "min") == (0.2, 3)
    rows = [{"m": 2.0, "id": "a"}, {"m": 1.0, "id": "b"}]
    assert best_of(rows, "min", key=lambda r: r["m"])["id"] == "b"
