"""The explicit RGB → IRRG sensor model used for the real-tile cross-sensor task."""

from __future__ import annotations

import numpy as np
import torch

from lpcgma.data.sensor import SensorShifted, rgb_to_irrg


def test_vegetation_is_bright_in_the_nir_band_and_water_dark() -> None:
    img = np.zeros((3, 4, 8), dtype=np.uint8)
    img[:, :, :4] = np.array([40, 120, 40])[:, None, None]  # green vegetation
    img[:, :, 4:] = np.array([30, 40, 90])[:, None, None]  # blue water
    out = rgb_to_irrg(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    veg_nir, water_nir = out[0, :, 1:3].mean(), out[0, :, 5:7].mean()
    assert veg_nir > 150 > water_nir
    # the red output band is the (re-scaled) red input: vegetation stays dark there
    assert out[1, :, 1:3].mean() < veg_nir


def test_sensor_shifted_keeps_masks() -> None:
    base = [
        {
            "image": torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8),
            "mask": torch.arange(64).view(8, 8) % 7,
            "name": "t0",
        }
    ]
    ds = SensorShifted(base)  # type: ignore[arg-type]
    s = ds[0]
    assert len(ds) == 1 and s["name"] == "t0@irrg"
    assert torch.equal(s["mask"], base[0]["mask"]) and not torch.equal(s["image"], base[0]["image"])
