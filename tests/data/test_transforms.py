import numpy as np
import torch

from lpcgma.data.transforms import EvalTransform, TextureAugment, TrainTransform

from .fixtures import blocky_labels

MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


def _sample(h: int = 64, w: int = 80, seed: int = 0) -> dict:
    """A tile whose image encodes its mask: every band = 30 * class + 10 (class 0..6)."""
    mask = torch.from_numpy(blocky_labels(np.random.default_rng(seed), h, w, 7, block=16).astype(np.int64))
    image = (mask * 30 + 10).to(torch.uint8).expand(3, h, w).clone()
    return {"image": image, "mask": mask, "name": "t"}


def _decode(image: torch.Tensor, mean=(0.0,) * 3, std=(1.0,) * 3) -> torch.Tensor:
    return image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def test_output_format():
    out = TrainTransform(48, (0.5, 2.0), True, True, MEAN, STD)(_sample(), seed=3)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 48, 48)
    assert out["mask"].dtype == torch.int64 and out["mask"].shape == (48, 48)
    assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor  # no tv_tensor leaks
    assert out["name"] == "t"


def test_deterministic_given_seed():
    t = TrainTransform(40, (0.5, 2.0), True, True, MEAN, STD)
    s = _sample()
    a, b = t(s, seed=11), t(s, seed=11)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    others = [t(s, seed=k) for k in range(12, 16)]
    assert any(not torch.equal(o["image"], a["image"]) for o in others)
    assert any(not torch.equal(o["mask"], a["mask"]) for o in others)


def test_global_rng_untouched():
    t = TrainTransform(40, (0.5, 2.0), True, True, MEAN, STD)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    t(_sample(), seed=7)
    assert torch.equal(torch.rand(5), expected)


def test_geometry_keeps_image_and_mask_aligned():
    t = TrainTransform(48, (1.0, 1.0), flips=True, photometric=False)
    for seed in range(8):
        out = t(_sample(h=40, w=72, seed=seed), seed=seed)  # height < crop: padded
        image, mask = _decode(out["image"]), out["mask"]
        valid = mask != 255
        assert (~valid).any() and valid.any()
        assert torch.equal(image[0][valid], (mask[valid] * 30 + 10).float())
        assert bool((image[:, ~valid] == 0).all())  # image padded with 0, mask with 255
        assert torch.equal(image[0], image[2])


def test_scaling_keeps_image_and_mask_aligned():
    t = TrainTransform(48, (0.5, 2.0), flips=True, photometric=False)
    agree = []
    for seed in range(8):
        out = t(_sample(seed=seed), seed=seed)
        image, mask = _decode(out["image"])[0], out["mask"]
        valid = mask != 255
        decoded = ((image - 10) / 30).round().long()
        agree.append((decoded[valid] == mask[valid]).float().mean().item())
    assert min(agree) > 0.85 and np.mean(agree) > 0.9  # only pixels at class edges may blend


def test_photometric_changes_the_image_only():
    s = _sample()
    geo = TrainTransform(48, (0.5, 2.0), True, photometric=False)
    pho = TrainTransform(48, (0.5, 2.0), True, photometric=True)
    changed = 0
    for seed in range(6):
        a, b = geo(s, seed=seed), pho(s, seed=seed)
        assert torch.equal(a["mask"], b["mask"])
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 3


def test_eval_transform_only_normalises():
    s = _sample()
    out = EvalTransform(MEAN, STD)(s)
    assert out["image"].shape == (3, 64, 80) and torch.equal(out["mask"], s["mask"])
    expected = (s["image"].float() - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(out["image"], expected)


def _speckle_sample(size: int = 64, seed: int = 0) -> dict:
    """A mid-grey tile of per-pixel speckle (the fine texture blur should remove), one class."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(np.clip(128 + 40 * rng.standard_normal((3, size, size)), 0, 255).astype(np.uint8))
    return {"image": image, "mask": torch.zeros(size, size, dtype=torch.int64), "name": "s"}


def _fine_energy(image: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours: the fine texture left in an image."""
    return float((image[..., 1:] - image[..., :-1]).abs().mean())


def test_texture_blur_removes_fine_texture_and_keeps_the_mask():
    s = _speckle_sample()
    plain = TrainTransform(48, (1.0, 1.0), flips=False, photometric=False)
    blurred = TrainTransform(48, (1.0, 1.0), flips=False, photometric=False, texture=TextureAugment(blur_prob=1.0))
    for seed in range(3):
        a, b = plain(s, seed=seed), blurred(s, seed=seed)
        assert torch.equal(a["mask"], b["mask"])
        assert _fine_energy(b["image"]) < 0.6 * _fine_energy(a["image"])  # σ ≥ 0.5 px averages speckle away
        assert abs(float(b["image"].mean()) - float(a["image"].mean())) < 2.0  # the colour stays


def test_texture_noise_adds_pixel_noise_of_the_given_std():
    flat = {"image": torch.full((3, 64, 64), 120, dtype=torch.uint8), "mask": torch.zeros(64, 64, dtype=torch.int64)}
    texture = TextureAugment(noise_prob=1.0, noise_std=15.0)
    noisy = TrainTransform(64, (1.0, 1.0), flips=False, photometric=False, texture=texture)
    out = noisy(flat, seed=1)["image"]
    assert abs(float(out.std()) - 15.0) < 1.0 and abs(float(out.mean()) - 120.0) < 1.0


def test_texture_augment_probability():
    s = _speckle_sample()
    half = TrainTransform(48, (1.0, 1.0), flips=False, photometric=False, texture=TextureAugment(blur_prob=0.5))
    plain = TrainTransform(48, (1.0, 1.0), flips=False, photometric=False)
    blurred = sum(not torch.equal(half(s, seed=k)["image"], plain(s, seed=k)["image"]) for k in range(40))
    assert 10 <= blurred <= 30
