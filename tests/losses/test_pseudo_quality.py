"""Pseudo-label diagnostics against hand-computed values."""

import pytest
import torch

from lpcgma.losses.pseudo_quality import pseudo_label_counts, pseudo_label_report

NAMES = ["a", "b", "c"]


def _example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 8 pixels (one ignored); truth / pseudo-label / confidence
    truth = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 255]])
    pseudo = torch.tensor([[0, 0, 1, 1, 0, 1, 2, 0]])
    conf = torch.tensor([[0.99, 0.5, 0.99, 0.99, 0.99, 0.3, 0.97, 0.99]])
    return truth.view(1, 2, 4), pseudo.view(1, 2, 4), conf.view(1, 2, 4)


def test_counts_split_all_and_confident_pixels():
    truth, pseudo, conf = _example()
    counts = pseudo_label_counts(pseudo, conf, truth, threshold=0.9, num_classes=3)
    every = torch.tensor([[2, 1, 0], [1, 1, 0], [0, 1, 1]])
    confident = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert torch.equal(counts[0], every) and torch.equal(counts[1], confident)


def test_report_matches_hand_computed_values():
    truth, pseudo, conf = _example()
    r = pseudo_label_report(pseudo_label_counts(pseudo, conf, truth, 0.9, 3), NAMES)
    assert r["pseudo/accuracy"] == pytest.approx(4 / 7)
    assert r["pseudo/confident_frac"] == pytest.approx(5 / 7)
    assert r["pseudo/confident_accuracy"] == pytest.approx(3 / 5)
    # class a: labelled a at 3 pixels (2 right), truly a at 3; confident labels a: 2 (1 right)
    assert r["pseudo/precision/a"] == pytest.approx(2 / 3)
    assert r["pseudo/recall/a"] == pytest.approx(2 / 3)
    assert r["pseudo/confident_precision/a"] == pytest.approx(1 / 2)
    assert r["pseudo/confident_share/a"] == pytest.approx(2 / 3)
    # class b: labelled b at 3 pixels (1 right), truly b at 2
    assert r["pseudo/precision/b"] == pytest.approx(1 / 3)
    assert r["pseudo/recall/b"] == pytest.approx(1 / 2)
    assert r["pseudo/confident_share/b"] == pytest.approx(2 / 3)
    assert r["pseudo/label_share/c"] == pytest.approx(1 / 7) and r["pseudo/true_share/c"] == pytest.approx(2 / 7)
    # IoU: a 2/(3+3-2), b 1/(3+2-1), c 1/(1+2-1)
    assert r["pseudo/miou"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 2) / 3)


def test_counts_add_up_over_steps_and_empty_counts_report_nothing():
    truth, pseudo, conf = _example()
    once = pseudo_label_counts(pseudo, conf, truth, 0.9, 3)
    twice = pseudo_label_report(once + once, NAMES)
    assert twice == pytest.approx(pseudo_label_report(once, NAMES))
    assert pseudo_label_report(torch.zeros(2, 3, 3, dtype=torch.long), NAMES) == {}
    ignored = torch.full_like(truth, 255)
    assert int(pseudo_label_counts(pseudo, conf, ignored, 0.9, 3).sum()) == 0


def test_a_class_never_labelled_has_no_precision():
    truth = torch.tensor([[[0, 1]]])
    pseudo = torch.tensor([[[0, 0]]])
    r = pseudo_label_report(pseudo_label_counts(pseudo, torch.ones(1, 1, 2), truth, 0.5, 2), ["x", "y"])
    assert "pseudo/precision/y" not in r and r["pseudo/recall/y"] == 0.0 and r["pseudo/label_share/y"] == 0.0
