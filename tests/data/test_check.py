"""`lpcgma data check`: each kind of problem is reported with its file and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcgma.cli import main
from lpcgma.data.check import LOVEDA_COUNTS, check_loveda

from .fixtures import write_isprs_tiles, write_loveda_tree

SIZE = 16


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_loveda_tree(tmp_path / "loveda", size=SIZE)


def check(root: Path, *args: str) -> list[str]:
    return ["data", "check", "--dataset", "loveda", "--root", str(root), "--tile-size", str(SIZE), *args]


def test_official_counts():
    assert sum(LOVEDA_COUNTS.values()) == 5987
    assert LOVEDA_COUNTS["Train", "Rural"] == 1366 and LOVEDA_COUNTS["Test", "Urban"] == 820


def test_correct_tree_passes_with_counts_relaxed(tree, capsys):
    assert main(check(tree, "--no-expect-counts")) == 0
    out = capsys.readouterr().out
    assert "LoveDA under" in out and ": OK" in out
    assert "Test/Urban        2      -         -        2         0" in out


def test_wrong_counts_are_a_problem_by_default(tree, capsys):
    assert main(check(tree)) == 1
    out = capsys.readouterr().out
    assert f"'{tree / 'Train' / 'Rural' / 'images_png'}': 2 images, the official count is 1366" in out
    assert "6 problem(s)" in out


def test_wrong_mask_values_are_reported(tree, capsys):
    mask = tree / "Val" / "Rural" / "masks_png" / "1.png"
    Image.fromarray(np.full((SIZE, SIZE), 9, dtype=np.uint8)).save(mask)
    assert main(check(tree, "--no-expect-counts")) == 1
    assert f"Val/Rural: mask '{mask}' holds invalid values [9]" in capsys.readouterr().out


def test_missing_and_orphan_masks_are_reported(tree, capsys):
    masks = tree / "Train" / "Urban" / "masks_png"
    (masks / "0.png").rename(masks / "7.png")
    assert main(check(tree, "--no-expect-counts")) == 1
    out = capsys.readouterr().out
    assert f"'{masks / '0.png'}': missing (the mask of '{tree / 'Train' / 'Urban' / 'images_png' / '0.png'}')" in out
    assert f"'{masks / '7.png'}': a mask without an image" in out


def test_wrong_size_and_corrupt_png_are_reported(tree, capsys):
    image = tree / "Test" / "Rural" / "images_png" / "0.png"
    Image.fromarray(np.zeros((SIZE, SIZE + 8, 3), dtype=np.uint8)).save(image)
    paired = tree / "Train" / "Rural" / "images_png" / "1.png"
    Image.fromarray(np.zeros((SIZE, SIZE + 8, 3), dtype=np.uint8)).save(paired)
    corrupt = tree / "Val" / "Urban" / "images_png" / "0.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    assert main(check(tree, "--no-expect-counts")) == 1
    out = capsys.readouterr().out
    assert f"'{image}': 24x16 pixels, expected 16x16" in out
    assert f"'{tree / 'Train' / 'Rural' / 'masks_png' / '1.png'}': 16x16 pixels but its image is 24x16" in out
    assert f"'{corrupt}': not a readable PNG" in out


def test_missing_split_folder_names_the_download_command(tree, capsys):
    assert main(check(tree.parent / "empty_root_that_does_not_exist")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(check(tree, "--no-expect-counts", "--splits", "Train")) == 0
    (tree / "Val" / "Urban" / "images_png").rename(tree / "moved")
    assert main(check(tree, "--no-expect-counts", "--splits", "val", "--domains", "urban")) == 1
    assert "folder missing (lpcgma data download loveda --root" in capsys.readouterr().out


def test_sample_reads_only_n_images_per_group(tree):
    mask = tree / "Train" / "Rural" / "masks_png" / "1.png"
    Image.fromarray(np.full((SIZE, SIZE), 8, dtype=np.uint8)).save(mask)
    sampled = check_loveda(tree, ["Train"], ["Rural"], expect_counts=False, sample=1, tile_size=SIZE)
    assert sampled.ok and sampled.groups[0].checked == 1  # 0.png only
    full = check_loveda(tree, ["Train"], ["Rural"], expect_counts=False, tile_size=SIZE)
    assert not full.ok and str(mask) in full.problems[0]


def test_real_loveda_sample(loveda_sample, capsys):
    args = ["data", "check", "--dataset", "loveda", "--root", str(loveda_sample), "--splits", "Train"]
    assert main([*args, "--domains", "Rural", "--no-expect-counts"]) == 0
    out = capsys.readouterr().out
    assert "Train/Rural      16     16         -       16         0" in out
    assert main([*args, "--domains", "Rural", "--sample", "2"]) == 1  # 16 tiles, not the official 1366
    assert "16 images, the official count is 1366" in capsys.readouterr().out


def test_isprs_tiles(tmp_path, capsys):
    write_isprs_tiles(tmp_path / "Potsdam", "potsdam", size=(8, 8))
    write_isprs_tiles(tmp_path / "Vaihingen", "vaihingen", size=(8, 8), skip=("top_mosaic_09cm_area7.tif",))
    args = ["data", "check", "--dataset", "isprs", "--root", str(tmp_path)]
    assert main([*args, "--isprs-datasets", "potsdam"]) == 0
    assert "Potsdam/train      24     24        24" in capsys.readouterr().out
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"Vaihingen/train: 'top_mosaic_09cm_area7.tif': not found under '{tmp_path / 'Vaihingen'}'" in out
