"""LoveDA (Wang et al., NeurIPS 2021) in its official folder layout, and the image/mask PNG-pair reader
it shares with the prepared ISPRS patches."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpcgma.data.classes import IGNORE_INDEX, LOVEDA_CLASSES, ClassInfo
from lpcgma.data.errors import DataError, DatasetNotFoundError

Sample = dict[str, torch.Tensor | str]

# raw LoveDA mask value → class id: 0 (no-data) → ignore, 1..7 → 0..6; -1 marks values that may not occur
LOVEDA_LUT = np.full(256, -1, dtype=np.int16)
LOVEDA_LUT[0] = IGNORE_INDEX
LOVEDA_LUT[1:8] = np.arange(7)

LOVEDA_URL = "https://zenodo.org/records/5706578"
_SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
_DOMAIN_DIRS = {"rural": "Rural", "urban": "Urban"}


def apply_mask_lut(raw: np.ndarray, lut: np.ndarray, source: str | Path = "mask") -> np.ndarray:
    """Map raw mask values to class ids (int64) through `lut`; a value the LUT marks -1 is a DataError."""
    if raw.dtype.kind not in "ui":
        raise DataError(f"mask '{source}' has dtype {raw.dtype}: expected integer class values")
    values = raw.astype(np.int64)
    in_range = (values >= 0) & (values < len(lut))
    mapped = np.where(in_range, lut[np.clip(values, 0, len(lut) - 1)], -1)
    if (mapped < 0).any():
        bad = np.unique(values[mapped < 0])[:10].tolist()
        valid = np.flatnonzero(lut >= 0).tolist()
        raise DataError(f"mask '{source}' holds invalid values {bad}; valid raw values: {valid}")
    return mapped.astype(np.int64)


def remap_loveda_mask(raw: np.ndarray, source: str | Path = "mask") -> np.ndarray:
    """LoveDA raw mask (0 no-data, 1..7 classes) → class ids 0..6 with 255 for no-data; other values raise."""
    return apply_mask_lut(raw, LOVEDA_LUT, source)


def read_png(path: Path, mode: Literal["RGB", "L"]) -> np.ndarray:
    """Decode a PNG: RGB → uint8 [H, W, 3]; L (a single-channel mask) → its integer values [H, W]."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB") if mode == "RGB" else im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read PNG '{path}' (corrupt or not a PNG): {e}") from e
    if mode == "L" and arr.ndim != 2:
        raise DataError(f"mask '{path}' has shape {arr.shape}: expected a single-channel PNG")
    return arr


def _sort_key(path: Path) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then any other names alphabetically."""
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


class PngPairs(Dataset[Sample]):
    """Raw samples from ``images_dir/<name>.png`` and ``masks_dir/<name>.png`` (matched by name).

    The pairing (every image has a mask) is checked when built; each mask's size and values are
    checked when read. Masks are mapped to class ids through `lut` (see `apply_mask_lut`). Without
    `masks_dir` the masks are all ignore (255).
    """

    classes: ClassInfo

    def __init__(self, images_dir: Path, masks_dir: Path | None, lut: np.ndarray, what: str) -> None:
        self.images_dir, self.masks_dir, self.lut = images_dir, masks_dir, lut
        self.images = sorted(images_dir.glob("*.png"), key=_sort_key)
        if not self.images:
            raise DataError(f"{what}: no PNG images in '{images_dir}' (empty split)")
        if masks_dir is not None:
            missing = [p.name for p in self.images if not (masks_dir / p.name).is_file()]
            if missing:
                raise DataError(
                    f"{what}: {len(missing)} image(s) have no mask in '{masks_dir}', e.g. "
                    f"'{masks_dir / missing[0]}' is missing (images: '{images_dir}')"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        path = self.images[index]
        image = read_png(path, "RGB")
        if self.masks_dir is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
        else:
            mask_path = self.masks_dir / path.name
            raw = read_png(mask_path, "L")
            if raw.shape != image.shape[:2]:
                raise DataError(
                    f"mask '{mask_path}' is {raw.shape[1]}x{raw.shape[0]} but image '{path}' is "
                    f"{image.shape[1]}x{image.shape[0]} (width x height)"
                )
            mask = apply_mask_lut(raw, self.lut, mask_path)
        return {
            "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(mask),
            "name": path.stem,
        }


class LoveDA(PngPairs):
    """One split and domain of LoveDA, read from the official layout
    ``root/{Train,Val,Test}/{Rural,Urban}/{images_png,masks_png}/<id>.png``.

    Samples are ``{"image": uint8 [3,1024,1024], "mask": int64 [H,W], "name": "<id>"}`` in numeric id
    order; mask values are raw − 1 with raw 0 (no-data) → 255. The Test split has no public masks:
    its masks are all 255 (ignore). With ``masks=False`` (an unlabelled target) the masks are
    never read, nor need to exist: they are all 255 too.
    """

    classes = LOVEDA_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"] = "train",
        domain: Literal["rural", "urban"] = "rural",
        masks: bool = True,
    ) -> None:
        if split not in _SPLIT_DIRS or domain not in _DOMAIN_DIRS:
            raise ValueError(f"LoveDA split={split!r}, domain={domain!r}: expected train|val|test and rural|urban")
        self.root, self.split, self.domain = Path(root), split, domain
        folder = self.root / _SPLIT_DIRS[split] / _DOMAIN_DIRS[domain]
        what = f"LoveDA {split}/{domain}"
        images_dir = folder / "images_png"
        masks_dir = None if split == "test" or not masks else folder / "masks_png"
        for d in (images_dir, masks_dir):
            if d is not None and not d.is_dir():
                raise DatasetNotFoundError(
                    f"{what} not found: expected the folder '{d}'. Download LoveDA from Zenodo record "
                    f"5706578 ({LOVEDA_URL}): the archive {_SPLIT_DIRS[split]}.zip (of Train.zip, Val.zip, "
                    f"Test.zip), and unzip it into '{self.root}' so that '{folder}/images_png/<id>.png' "
                    "exists."
                )
        super().__init__(images_dir, masks_dir, LOVEDA_LUT, what)


def sample_loveda(
    root: str | Path,
    out: str | Path,
    tiles: int,
    split: Literal["train", "val"] = "train",
    domain: Literal["rural", "urban"] = "rural",
) -> list[str]:
    """Copy `tiles` image/mask pairs of one LoveDA split and domain, evenly spread over its numeric
    ids, from `root` to `out` in the official layout (what ``loveda_sample.yaml`` reads); returns
    their ids. Every copied mask is decoded and checked first: nothing is written from a tile that
    would not load. Refuses a destination that already holds tiles."""
    source = LoveDA(root, split, domain)
    if not 1 <= tiles <= len(source):
        raise ValueError(f"--tiles {tiles}: expected 1 to {len(source)} (the tiles of {source.images_dir.parent})")
    picks = [source.images[int(i)] for i in np.linspace(0, len(source) - 1, tiles).round().astype(int)]
    picks = sorted(set(picks), key=_sort_key)
    assert source.masks_dir is not None
    for image in picks:  # the same checks as training's reader: size and mask values
        source[source.images.index(image)]
    folder = Path(out) / _SPLIT_DIRS[split] / _DOMAIN_DIRS[domain]
    if any(folder.glob("*/*.png")):
        raise ValueError(f"'{folder}' already holds tiles: choose another --out or remove it")
    for sub, files in (("images_png", picks), ("masks_png", [source.masks_dir / p.name for p in picks])):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, folder / sub / f.name)
    return [p.stem for p in picks]
