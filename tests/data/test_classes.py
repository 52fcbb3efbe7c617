import numpy as np
import pytest

from lpcgma.data.classes import (
    IGNORE_INDEX,
    ISPRS_CLASSES,
    ISPRS_CLASSES_NO_CLUTTER,
    LOVEDA_CLASSES,
    MEAN_STD,
    ClassInfo,
)


def test_loveda_classes_in_official_order_with_palette():
    assert LOVEDA_CLASSES.names == (
        "background",
        "building",
        "road",
        "water",
        "barren",
        "forest",
        "agriculture",
    )
    assert LOVEDA_CLASSES.palette[1] == (255, 0, 0) and LOVEDA_CLASSES.palette[3] == (0, 0, 255)
    assert len(set(LOVEDA_CLASSES.palette)) == 7


def test_isprs_colour_map():
    expected = {
        "impervious surfaces": (255, 255, 255),
        "building": (0, 0, 255),
        "low vegetation": (0, 255, 255),
        "tree": (0, 255, 0),
        "car": (255, 255, 0),
        "clutter": (255, 0, 0),
    }
    assert dict(zip(ISPRS_CLASSES.names, ISPRS_CLASSES.palette, strict=True)) == expected
    assert ISPRS_CLASSES_NO_CLUTTER.names == ISPRS_CLASSES.names[:5]


def test_colorize_maps_ids_and_blackens_ignore():
    mask = np.array([[0, 1], [6, IGNORE_INDEX]])
    rgb = LOVEDA_CLASSES.colorize(mask)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == LOVEDA_CLASSES.palette[1]
    assert tuple(rgb[1, 0]) == LOVEDA_CLASSES.palette[6]
    assert tuple(rgb[1, 1]) == (0, 0, 0)


def test_classinfo_checks_lengths():
    with pytest.raises(ValueError):
        ClassInfo(names=("a", "b"), palette=((0, 0, 0),))


def test_normalisation_stats_in_pixel_units():
    for mean, std in MEAN_STD.values():
        assert all(50 < m < 200 for m in mean) and all(20 < s < 100 for s in std)
