import numpy as np
import pytest
import torch

from lpcgma.data.sampling import RareClassSampler, class_frequencies, class_histograms, rcs_class_probs


class Masks:
    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return {"mask": torch.as_tensor(self.masks[i])}


def test_histograms_count_pixels_and_skip_ignore():
    ds = Masks([[[0, 0, 255], [2, 2, 2]], [[1, 255, 255], [255, 255, 255]]])
    hist = class_histograms(ds)
    assert hist.tolist() == [[2, 0, 3], [0, 1, 0]]
    assert class_histograms(ds, num_classes=5).shape == (2, 5)
    with pytest.raises(ValueError):
        class_histograms(ds, num_classes=2)
    assert np.allclose(class_frequencies(hist), [2 / 6, 1 / 6, 3 / 6])


def test_rcs_probs_favour_rare_classes():
    freq = np.array([0.6, 0.3, 0.09, 0.01, 0.0])
    p = rcs_class_probs(freq, temperature=0.1)
    assert np.isclose(p.sum(), 1) and p[4] == 0  # absent class never drawn
    assert p[3] > p[2] > p[1] > p[0]
    expected = np.exp((1 - freq[:4]) / 0.1)
    assert np.allclose(p[:4], expected / expected.sum())
    assert np.allclose(rcs_class_probs(freq, temperature=1e6)[:4], 0.25)  # hot → uniform
    with pytest.raises(ValueError):
        rcs_class_probs(freq, temperature=0)


def _rare_histograms():
    """100 tiles of classes 0/1; class 2 (rare) only in tiles 7 and 40 (tile 3 has a single pixel)."""
    hist = np.zeros((100, 3), dtype=np.int64)
    hist[:, 0], hist[::2, 1] = 900, 100
    hist[[7, 40], 2] = 50
    hist[3, 2] = 1
    return hist


def test_sampler_draws_rare_class_tiles_far_more_than_uniform():
    sampler = RareClassSampler.from_histograms(_rare_histograms(), temperature=0.01, min_fraction=0.01)
    assert sampler.tiles[2].tolist() == [7, 40]  # tile 3's single pixel is below min_fraction
    rng = np.random.default_rng(0)
    draws = np.array([sampler.sample(rng) for _ in range(2000)])
    rare_share = np.isin(draws, [7, 40]).mean()
    assert rare_share > 0.9  # uniform sampling would give 2 / 100
    assert set(draws) <= set(range(100))


def test_sampler_is_reproducible_and_respects_indices():
    hist = _rare_histograms()
    shard = np.arange(1, 100, 2)  # odd tiles: rank 1 of 2
    sampler = RareClassSampler.from_histograms(hist, temperature=0.01, indices=shard)
    a = [sampler.sample(np.random.default_rng(5)) for _ in range(3)]
    b = [sampler.sample(np.random.default_rng(5)) for _ in range(3)]
    assert a == b
    draws = [sampler.sample(np.random.default_rng(i)) for i in range(300)]
    assert all(t % 2 == 1 for t in draws)
    assert sampler.tiles[1].size == 0 and sampler.probs[1] == 0  # no odd tile has class 1
    assert 7 in draws  # the shard's rare-class tile


def test_from_dataset():
    ds = Masks([np.zeros((4, 4), dtype=np.int64), np.ones((4, 4), dtype=np.int64)])
    sampler = RareClassSampler.from_dataset(ds, temperature=1.0)
    assert [t.tolist() for t in sampler.tiles] == [[0], [1]]
