"""Strong photometric views of normalised image batches, for pixel contrast (PIX).

The strong view keeps geometry (so pixel i in both views is the same location) and changes
appearance: per-image colour jitter (gain/offset per channel), a random channel re-weighting that
mimics an RGB ↔ IRRG sensor change (channel permutation/mixing), and a small Gaussian blur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _gaussian_kernel(sigma: Tensor, size: int = 5) -> Tensor:
    """[B, 1, size, size] normalised Gaussian kernels, one per image."""
    ax = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    g = torch.exp(-(ax[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k = g[:, :, None] * g[:, None, :]
    return (k / k.sum(dim=(1, 2), keepdim=True))[:, None]


def strong_view(images: Tensor, irrg_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """A photometrically strong view of `images` [B, 3, H, W] (normalised), same geometry."""
    b, c, h, w = images.shape
    dev, dt = images.device, images.dtype

    # every random number of the view, drawn in the usual order on the CPU generator, then one
    # host→device copy (each separate copy is a synchronisation on CUDA)
    draws = [torch.rand(b, c, generator=generator), torch.rand(b, c, generator=generator)]
    draws.append(torch.stack([torch.randperm(c, generator=generator) for _ in range(b)]).to(torch.float32))
    draws += [torch.rand(b, 1, generator=generator) for _ in range(3)]
    gain_u, offset_u, perm_f, use_u, weight_u, sigma_u = torch.cat(draws, dim=1).to(dev).split([c, c, c, 1, 1, 1], 1)

    gain = 0.6 + 0.8 * gain_u.to(dt)[..., None, None]
    offset = 0.6 * (offset_u.to(dt)[..., None, None] - 0.5)
    x = images * gain + offset
    # sensor-like channel re-weighting: a random permutation blended with identity
    perms = perm_f.long()
    mixing = torch.eye(c, device=dev, dtype=dt)[perms]  # [B, C, C] permutation matrices
    use = (use_u.to(dt)[..., None] < irrg_prob).to(dt)
    weight = 0.5 + 0.5 * weight_u.to(dt)[..., None]
    mixing = use * (weight * mixing + (1 - weight) * torch.eye(c, device=dev, dtype=dt)) + (1 - use) * torch.eye(
        c, device=dev, dtype=dt
    )
    x = torch.einsum("bij,bjhw->bihw", mixing, x)
    sigma = 0.1 + 1.4 * sigma_u.to(dt)[:, 0]
    kernel = _gaussian_kernel(sigma).repeat_interleave(c, dim=0)  # [B*C, 1, 5, 5]
    x = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect"), kernel, groups=b * c)
    return x.reshape(b, c, h, w)
