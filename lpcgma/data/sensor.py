"""An explicit, documented sensor shift: render RGB tiles as if seen by an IRRG (NIR-R-G) camera.

Used to build a cross-sensor task from real RGB tiles alone (the LoveDA sample has one domain):
source = the tiles as captured, target = the same tiles through this sensor model, as Potsdam RGB →
Vaihingen IRRG in the ISPRS benchmark. The NIR band is estimated from visible bands with the
classic vegetation proxy (vegetation reflects strongly in NIR, water absorbs it): NIR ≈ 0.9·G +
1.6·max(G − R, 0) + 0.25·max(G − B, 0), then the composite (NIR, R, G) gets a different radiometric
response (gain, offset, gamma) and a slight blur (a coarser optical transfer function). Labels are
unchanged. Deterministic: no randomness.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IRRG_GAIN = np.array([1.05, 0.85, 0.9], dtype=np.float32)  # per output band (NIR, R, G)
IRRG_OFFSET = np.array([0.02, 0.06, 0.04], dtype=np.float32)
IRRG_GAMMA = 0.8


def rgb_to_irrg(image: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] RGB → uint8 [3, H, W] IRRG-like composite (see the module docstring)."""
    x = image.astype(np.float32) / 255.0
    r, g, b = x[0], x[1], x[2]
    nir = 0.9 * g + 1.6 * np.maximum(g - r, 0.0) + 0.25 * np.maximum(g - b, 0.0)
    out = np.stack([nir, r, g])
    out = np.clip(out * IRRG_GAIN[:, None, None] + IRRG_OFFSET[:, None, None], 0.0, 1.0) ** IRRG_GAMMA
    # 3×3 box blur per band: a softer sensor
    padded = np.pad(out, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = out.shape[1:]
    blurred = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return (np.clip(blurred, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SensorShifted(Dataset[dict[str, Any]]):
    """Wraps a raw-sample dataset; images pass through `rgb_to_irrg`, masks unchanged."""

    def __init__(self, base: Dataset[dict[str, Any]]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.base[index])
        sample["image"] = torch.from_numpy(rgb_to_irrg(sample["image"].numpy()))
        sample["name"] = f"{sample['name']}@irrg"
        return sample
