"""Strong photometric views keep geometry; ClassMix pastes whole source classes."""

from __future__ import annotations

import torch

from lpcgma.methods.mixing import classmix_masks, mix
from lpcgma.methods.views import strong_view


def test_strong_view_changes_appearance_not_geometry() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(2, 3, 32, 32)
    img[:, :, 8:16, 8:16] = 3.0  # a bright square
    out = strong_view(img, irrg_prob=1.0, generator=g)
    assert out.shape == img.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, img)
    # the square stays where it was: its pixels remain the brightest (blur only softens the border)
    inside = out[:, :, 10:14, 10:14].mean(dim=(2, 3))
    outside = out[:, :, 20:30, 20:30].mean(dim=(2, 3))
    assert (inside > outside).all()


def test_strong_view_is_reproducible_with_a_generator() -> None:
    img = torch.randn(2, 3, 16, 16)
    a = strong_view(img, 0.5, torch.Generator().manual_seed(3))
    b = strong_view(img, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_classmix_pastes_half_of_the_present_classes() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 3], [255, 255, 3, 3]]])
    g = torch.Generator().manual_seed(0)
    mask = classmix_masks(labels, g)
    pasted = torch.unique(labels[mask])
    assert pasted.numel() == 2 and 255 not in pasted.tolist()
    # whole classes: every pixel of a chosen class is pasted, none of the others
    for c in range(4):
        sel = labels == c
        assert mask[sel].all() or not mask[sel].any()
    src, tgt = torch.ones(1, 3, 3, 4), torch.zeros(1, 3, 3, 4)
    mixed = mix(mask, src, tgt)
    assert torch.equal(mixed[:, 0].bool(), mask)


def test_classmix_picks_ceil_half_of_each_images_classes_uniformly() -> None:
    labels = torch.stack(
        [
            torch.tensor([[0, 1, 2], [0, 1, 2]]),  # 3 classes → 2 pasted
            torch.tensor([[5, 5, 6], [255, 255, 255]]),  # 2 classes (and ignore) → 1 pasted
            torch.full((2, 3), 255),  # nothing to paste
        ]
    )
    g = torch.Generator().manual_seed(0)
    picked = torch.zeros(7)
    for _ in range(200):
        mask = classmix_masks(labels, g)
        assert [len(torch.unique(labels[i][mask[i]])) for i in range(3)] == [2, 1, 0]
        assert not mask[labels == 255].any()
        for c in range(7):
            picked[c] += bool(mask[labels == c].any())
    # each class of image 0 is picked 2/3 of the time, of image 1 half of the time
    assert all(100 < picked[c] < 170 for c in (0, 1, 2))
    assert all(70 < picked[c] < 130 for c in (5, 6))
