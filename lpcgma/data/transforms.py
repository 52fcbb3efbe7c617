"""Joint image/mask augmentation and normalisation (torchvision.transforms.v2), seeded per call.

A transform maps a raw sample ``{"image": uint8 [3,H,W], "mask": int64 [H,W], "name"}`` to
``{"image": float32 [3,h,w] normalised by mean/std, "mask": int64 [h,w], "name"}``. Its randomness
comes only from the `seed` argument: the same seed gives the same output, and the caller's global
torch RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lpcgma.data.classes import IGNORE_INDEX

Sample = dict[str, Any]


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale_range` (images bilinear, masks nearest)."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.scale_range
        return {"scale": lo + (hi - lo) * torch.rand(()).item()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = F.get_size(inpt)
        size = [max(1, round(h * params["scale"])), max(1, round(w * params["scale"]))]
        return F.resize(inpt, size, antialias=True)


class RandomRot90(v2.Transform):
    """Rotate by a uniformly drawn multiple of 90 degrees."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block on the CPU torch RNG seeded with `seed`, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


class _Transform:
    """Applies a v2 pipeline to a raw sample's image and mask under an explicit seed."""

    pipeline: v2.Compose

    def __call__(self, sample: Sample, seed: int = 0) -> Sample:
        image = tv_tensors.Image(sample["image"])
        mask = tv_tensors.Mask(sample["mask"])
        with seeded(seed):
            image, mask = self.pipeline(image, mask)
        out = dict(sample)
        out["image"] = image.as_subclass(torch.Tensor)
        out["mask"] = mask.as_subclass(torch.Tensor).long()
        return out


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=False),
        v2.Normalize(list(mean), list(std)),
    ]


@dataclass(frozen=True)
class TextureAugment:
    """Texture-robust augmentation of an image: Gaussian blur (σ uniform in [0.5, 1.5] px) with
    probability `blur_prob`, then Gaussian pixel noise of std `noise_std` (0-255 units) with
    probability `noise_prob`. Blur removes fine texture; noise puts speckle on every class, so neither
    stays a class cue. Masks are never changed."""

    blur_prob: float = 0.0
    noise_prob: float = 0.0
    noise_std: float = 20.0

    def steps(self) -> tuple[list[v2.Transform], list[v2.Transform]]:
        """(steps on the uint8 image, steps on the float 0-255 image before normalisation)."""
        on_uint8: list[v2.Transform] = []
        on_float: list[v2.Transform] = []
        if self.blur_prob > 0:
            on_uint8.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.5, 1.5))], p=self.blur_prob))
        if self.noise_prob > 0:
            noise = v2.GaussianNoise(mean=0.0, sigma=self.noise_std, clip=False)
            on_float.append(v2.RandomApply([noise], p=self.noise_prob))
        return on_uint8, on_float


class TrainTransform(_Transform):
    """Random scale → random crop to `crop_size` (padding image 0, mask 255) → flips and rot90 →
    photometric jitter (image only) → optional texture augmentation (image only) → normalise.
    `mean`/`std` are in 0-255 pixel units."""

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flips: bool = True,
        photometric: bool = True,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        texture: TextureAugment = TextureAugment(),
    ) -> None:
        steps: list[v2.Transform] = []
        if tuple(scale_range) != (1.0, 1.0):
            steps.append(RandomScale(scale_range))
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill))
        if flips:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
        if photometric:
            jitter = v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)
            steps.append(v2.RandomApply([jitter], p=0.8))
        on_uint8, on_float = texture.steps()
        to_float, normalise = _normalise(mean, std)
        self.pipeline = v2.Compose([*steps, *on_uint8, to_float, *on_float, normalise])


class EvalTransform(_Transform):
    """Normalisation only (whole tiles); `seed` is accepted for a uniform call and ignored."""

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        self.pipeline = v2.Compose(_normalise(mean, std))
