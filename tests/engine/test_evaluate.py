"""Metrics from the confusion matrix and sliding-window inference over whole tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcgma.engine.evaluate import confusion_matrix, metrics_from_confusion, sliding_window_scores


def _reference_metrics(pred: np.ndarray, gt: np.ndarray, c: int) -> tuple[float, float]:
    valid = gt != 255
    ious = []
    for k in range(c):
        inter = np.sum((pred == k) & (gt == k) & valid)
        union = np.sum(((pred == k) | (gt == k)) & valid)
        if union > 0:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.sum((pred == gt) & valid) / max(1, valid.sum()))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6))
def test_miou_and_oa_match_a_plain_reference(seed: int, c: int) -> None:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, c, size=(20, 20))
    gt[rng.random((20, 20)) < 0.2] = 255
    pred = rng.integers(0, c, size=(20, 20))
    m = metrics_from_confusion(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), c), [f"c{i}" for i in range(c)]
    )
    miou, oa = _reference_metrics(pred, gt, c)
    assert m["miou"] == pytest.approx(miou)
    assert m["oa"] == pytest.approx(oa)


def test_ignore_index_never_counted() -> None:
    gt = torch.full((4, 4), 255)
    gt[0, 0] = 1
    pred = torch.zeros(4, 4, dtype=torch.long)
    cm = confusion_matrix(pred, gt, 3)
    assert cm.sum() == 1 and cm[1, 0] == 1


def test_perfect_prediction_scores_one() -> None:
    gt = torch.randint(0, 4, (16, 16))
    m = metrics_from_confusion(confusion_matrix(gt, gt, 4), list("abcd"), prefix="target_")
    assert m["target_miou"] == 1.0 and m["target_mf1"] == 1.0 and m["target_oa"] == 1.0
    assert {f"target_iou/{c}" for c in "abcd"} <= set(m)


@pytest.mark.parametrize(("h", "w", "window", "stride"), [(50, 70, 32, 24), (20, 20, 32, 32), (64, 64, 32, 32)])
def test_sliding_window_covers_tile_and_matches_full_image(h: int, w: int, window: int, stride: int) -> None:
    # a per-pixel "network": logits depend only on the pixel itself, so windows must agree with full-image
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1] * k for k in range(3)], dim=1)

    image = torch.randn(3, h, w)
    out = sliding_window_scores(predict, image, 3, window, stride, batch=3)
    assert out.shape == (3, h, w)
    torch.testing.assert_close(out, predict(image[None])[0].softmax(0))


def test_test_scale_predicts_the_resized_tile_and_returns_full_size_scores() -> None:
    # left half class 0, right half class 2 (a per-pixel "network" reading the first band)
    seen: list[tuple[int, int]] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.extend([tuple(x.shape[-2:])] * x.shape[0])  # type: ignore[list-item]
        return torch.cat([x[:, :1] * k for k in range(3)], dim=1) * 10

    image = torch.ones(3, 128, 128)
    image[:, :, :64] = -1.0
    full = sliding_window_scores(predict, image, 3, 32, 32)
    windows_at_full_scale = len(seen)
    seen.clear()
    half = sliding_window_scores(predict, image, 3, 32, 32, scale=0.5)
    assert half.shape == full.shape == (3, 128, 128)
    assert windows_at_full_scale == 16 and len(seen) == 4 and set(seen) == {(32, 32)}  # 64×64 after resizing
    # away from the class boundary the prediction is unchanged; the scores still sum to one per pixel
    assert torch.equal(half.argmax(0)[:, :60], full.argmax(0)[:, :60])
    assert torch.equal(half.argmax(0)[:, 68:], full.argmax(0)[:, 68:])
    torch.testing.assert_close(half.sum(0), torch.ones(128, 128))
