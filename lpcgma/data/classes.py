"""Class names, palettes and normalisation statistics of each dataset family."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255  # mask value of pixels that carry no label (no-data, eroded boundaries)

RGB = tuple[int, int, int]
Stats = tuple[float, float, float]


@dataclass(frozen=True)
class ClassInfo:
    """The classes of a dataset: names in class-id order and one display colour per class."""

    names: tuple[str, ...]
    palette: tuple[RGB, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(f"{len(self.names)} class names but {len(self.palette)} palette colours")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """An RGB uint8 [H, W, 3] rendering of a class-id mask; ignore and unknown ids are black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[np.asarray(mask).astype(np.int64).clip(0, 255)]


# LoveDA (Wang et al., NeurIPS 2021): colours of the official LoveDA code's COLOR_MAP.
LOVEDA_CLASSES = ClassInfo(
    names=("background", "building", "road", "water", "barren", "forest", "agriculture"),
    palette=(
        (255, 255, 255),
        (255, 0, 0),
        (255, 255, 0),
        (0, 0, 255),
        (159, 129, 183),
        (0, 255, 0),
        (255, 195, 128),
    ),
)

# ISPRS 2D semantic labelling (Potsdam, Vaihingen): the official label colour map.
ISPRS_CLASSES = ClassInfo(
    names=("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"),
    palette=(
        (255, 255, 255),
        (0, 0, 255),
        (0, 255, 255),
        (0, 255, 0),
        (255, 255, 0),
        (255, 0, 0),
    ),
)

# The 5-class ISPRS protocol: clutter (the last class) is ignored, so the model has 5 outputs.
ISPRS_CLASSES_NO_CLUTTER = ClassInfo(names=ISPRS_CLASSES.names[:5], palette=ISPRS_CLASSES.palette[:5])

# The synthetic benchmark mimics LoveDA's classes.
SYNTHETIC_CLASSES = LOVEDA_CLASSES

# Normalisation statistics in 0-255 pixel units (ImageNet's, as the encoders are ImageNet-pretrained).
IMAGENET_MEAN: Stats = (123.675, 116.28, 103.53)
IMAGENET_STD: Stats = (58.395, 57.12, 57.375)
MEAN_STD: dict[str, tuple[Stats, Stats]] = {
    "synthetic": (IMAGENET_MEAN, IMAGENET_STD),
    "loveda": (IMAGENET_MEAN, IMAGENET_STD),
    "isprs": (IMAGENET_MEAN, IMAGENET_STD),
}

_FAMILY_CLASSES = {"synthetic": SYNTHETIC_CLASSES, "loveda": LOVEDA_CLASSES, "isprs": ISPRS_CLASSES}


def family_classes(family: str, ignore_clutter: bool = False) -> ClassInfo:
    """The classes of a dataset family; ISPRS without clutter (5 classes) when `ignore_clutter`."""
    if family == "isprs" and ignore_clutter:
        return ISPRS_CLASSES_NO_CLUTTER
    return _FAMILY_CLASSES[family]
