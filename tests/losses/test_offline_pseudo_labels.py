"""Offline pseudo-labels (lpcgma.losses.offline_pseudo_labels): per-class median thresholds, capped."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.losses.offline_pseudo_labels import (
    apply_class_thresholds,
    class_median_thresholds,
    median_index,
    offline_pseudo_labels,
    running_class_thresholds,
)

IGNORE = 255
FAST = settings(max_examples=40, deadline=None)


def _reference(confidence: list[float], prediction: list[int], num_classes: int, cap: float):
    """Plain loops: θ_c = min(sorted(q of class c)[round(n_c/2)], cap) (np.round: half to even), +inf
    for a class without pixels; a pixel keeps its class when q ≥ θ_class, else 255."""
    cap = float(np.float32(cap))  # θ is float32: the cap as the float32 it becomes
    thresholds = []
    for c in range(num_classes):
        xs = sorted(q for q, y in zip(confidence, prediction, strict=True) if y == c)
        thresholds.append(min(xs[int(np.round(len(xs) * 0.5))], cap) if xs else math.inf)
    labels = [
        y if 0 <= y < num_classes and q >= thresholds[y] else IGNORE
        for q, y in zip(confidence, prediction, strict=True)
    ]
    return thresholds, labels


def _random_probs(seed: int, n: int, c: int, absent: int, ties: bool) -> torch.Tensor:
    """Probabilities [n, c]; the classes [0, absent) are never the argmax; `ties`: few distinct values."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    if ties:
        logits = logits.round()
    logits[:, :absent] = -1e4
    return logits.softmax(dim=1)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 60),
    c=st.integers(1, 6),
    absent=st.integers(0, 3),
    cap=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    ties=st.booleans(),
)
def test_offline_pseudo_labels_match_plain_loops(
    seed: int, n: int, c: int, absent: int, cap: float, ties: bool
) -> None:
    absent = min(absent, c - 1)
    probs = _random_probs(seed, n, c, absent, ties)
    labels, thresholds = offline_pseudo_labels(probs, cap)
    conf, pred = probs.max(dim=1)
    ref_thresholds, ref_labels = _reference(conf.tolist(), pred.tolist(), c, cap)
    assert thresholds.dtype == torch.float32 and not thresholds.isnan().any()
    assert thresholds.tolist() == ref_thresholds  # exact: the same float32 values
    assert labels.tolist() == ref_labels
    for k in range(absent):  # classes absent from the predictions: +inf, and no pixel of theirs kept
        assert thresholds[k].item() == math.inf and not (labels == k).any()


def test_median_is_the_released_codes_index() -> None:
    # np.round(n/2): 1 → 0, 2 → 1, 3 → 2 (1.5 rounds to 2), 5 → 2 (2.5 rounds to 2), 6 → 3
    assert median_index(torch.tensor([0, 1, 2, 3, 4, 5, 6])).tolist() == [0, 0, 1, 2, 2, 2, 3]
    conf = torch.tensor([0.3, 0.1, 0.2, 0.8, 0.6, 0.7])
    pred = torch.tensor([0, 0, 0, 1, 1, 255])  # class 0: [.1 .2 .3] → index 2 = .3; class 1: [.6 .8] → .8
    thresholds = class_median_thresholds(conf, pred, 3, cap=0.75)
    assert thresholds.tolist() == [pytest.approx(0.3), 0.75, math.inf]  # class 1 capped, class 2 absent
    labels = apply_class_thresholds(conf, pred, thresholds)
    assert labels.tolist() == [0, IGNORE, IGNORE, 1, IGNORE, IGNORE]  # 255 in the predictions stays 255
    assert labels.dtype == pred.dtype


def test_any_shape_and_uint8_predictions() -> None:
    probs = _random_probs(3, 2 * 5 * 7, 4, 1, False).reshape(2, 5, 7, 4).permute(0, 3, 1, 2)  # [N, C, H, W]
    labels, thresholds = offline_pseudo_labels(probs)
    assert labels.shape == (2, 5, 7)
    conf, pred = probs.max(dim=1)
    same = class_median_thresholds(conf.half(), pred.to(torch.uint8), 4)  # float16 storage, uint8 ids
    ref, _ = _reference(conf.half().float().flatten().tolist(), pred.flatten().tolist(), 4, 0.9)
    assert same.tolist() == ref
    assert apply_class_thresholds(conf.half(), pred.to(torch.uint8), same).dtype == torch.uint8


def test_confidences_outside_the_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_median_thresholds(torch.tensor([0.5, 1.5]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_median_thresholds(torch.tensor([float("nan")]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="differ in size"):
        class_median_thresholds(torch.tensor([0.5, 0.5]), torch.tensor([0]), 2)


class _ThreadAllReduce:
    """An all-reduce (sum) between threads: each 'rank' deposits its tensor and gets the sum."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.slots: list[torch.Tensor] = [torch.zeros(0)] * ranks

    def for_rank(self, rank: int):  # type: ignore[no-untyped-def]
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(dim=0)
            self.barrier.wait()  # nobody overwrites a slot before every rank has summed
            return total

        return reduce


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(0, 30), min_size=2, max_size=3))
def test_shards_with_an_all_reduce_get_the_thresholds_of_the_whole_set(seed: int, sizes: list[int]) -> None:
    probs = _random_probs(seed, sum(sizes), 5, 1, seed % 2 == 0)
    conf, pred = probs.max(dim=1)
    whole = class_median_thresholds(conf, pred, 5, 0.9)
    bounds = np.cumsum([0, *sizes])
    results: list[torch.Tensor | None] = [None] * len(sizes)
    reducer = _ThreadAllReduce(len(sizes))

    def run(rank: int) -> None:
        lo, hi = bounds[rank], bounds[rank + 1]
        results[rank] = class_median_thresholds(conf[lo:hi], pred[lo:hi], 5, 0.9, reducer.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        assert r is not None and torch.equal(r, whole)


def test_running_class_thresholds_move_present_classes_toward_their_capped_median() -> None:
    # the released code's median (index round(n/2), half to even): class 0: 0.2, 0.4, 0.6 → index 2, 0.6;
    # class 1: 0.95, 0.99 → index 1, 0.99, capped at 0.9; class 2: no pixel in the batch, keeps its threshold
    confidence = torch.tensor([0.2, 0.4, 0.6, 0.95, 0.99])
    prediction = torch.tensor([0, 0, 0, 1, 1])
    before = torch.tensor([0.9, 0.5, 0.7])
    after = running_class_thresholds(before, confidence, prediction, cap=0.9, momentum=0.75)
    expected = torch.tensor([0.75 * 0.9 + 0.25 * 0.6, 0.75 * 0.5 + 0.25 * 0.9, 0.7])
    torch.testing.assert_close(after, expected)
    assert after.dtype == torch.float32 and torch.equal(before, torch.tensor([0.9, 0.5, 0.7]))  # a new tensor
    # momentum 0 is the batch's rule itself; momentum 1 never moves
    torch.testing.assert_close(
        running_class_thresholds(before, confidence, prediction, 0.9, 0.0), torch.tensor([0.6, 0.9, 0.7])
    )
    torch.testing.assert_close(running_class_thresholds(before, confidence, prediction, 0.9, 1.0), before)


def test_running_class_thresholds_let_a_never_confident_class_through() -> None:
    # the teacher is never ≥ δ = 0.968 about class 1; its threshold falls to its median and the upper half passes
    generator = torch.Generator().manual_seed(0)
    thresholds = torch.full((2,), 0.968)
    for _ in range(100):
        prediction = torch.randint(0, 2, (4, 8, 8), generator=generator)
        confidence = torch.where(prediction == 0, 0.99, 0.5 + 0.3 * torch.rand(4, 8, 8, generator=generator))
        thresholds = running_class_thresholds(thresholds, confidence, prediction, cap=0.968, momentum=0.9)
    assert thresholds[0] == pytest.approx(0.968, abs=1e-6)  # capped at δ
    assert thresholds[1] == pytest.approx(0.65, abs=0.02)  # the median of U(0.5, 0.8)
