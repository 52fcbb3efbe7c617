import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lpcgma.data import isprs
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import (
    TILES,
    ISPRSPatches,
    decode_isprs_label,
    patch_origins,
    prepare_isprs,
    read_tif,
)

from .fixtures import colour_label, eroded, write_isprs_tiles

PATCH = 32


@pytest.fixture(scope="module")
def potsdam(tmp_path_factory):
    src = tmp_path_factory.mktemp("potsdam_src")
    return src, write_isprs_tiles(src, "potsdam", size=(64, 64))


@pytest.fixture(scope="module")
def vaihingen(tmp_path_factory):
    src = tmp_path_factory.mktemp("vaihingen_src")
    return src, write_isprs_tiles(src, "vaihingen", size=(64, 64), seed=1)


def _patch(out, dataset, split, tile, y, x):
    folder = out / dataset / split
    name = f"{tile}_{y}_{x}.png"
    return np.asarray(Image.open(folder / "images" / name)), np.asarray(Image.open(folder / "masks" / name))


def test_standard_tile_splits():
    assert len(TILES["potsdam"]["train"]) == 24 and len(TILES["potsdam"]["val"]) == 14
    assert len(TILES["vaihingen"]["train"]) == 16 and len(TILES["vaihingen"]["val"]) == 17
    for splits in TILES.values():
        assert not set(splits["train"]) & set(splits["val"])


def test_patch_origins_cover_the_edge():
    assert patch_origins(96, 32, 32) == [0, 32, 64]
    assert patch_origins(100, 32, 32) == [0, 32, 64, 68]
    assert patch_origins(64, 32, 16) == [0, 16, 32]
    assert patch_origins(20, 32, 32) == [0]


def test_prepare_potsdam_counts_splits_colours_and_eroded_boundary(potsdam, tmp_path):
    src, tiles = potsdam
    counts = prepare_isprs(src, tmp_path, "potsdam", "irrg", patch_size=PATCH, stride=PATCH)
    assert counts == {"train": 24 * 4, "val": 14 * 4}
    for split in ("train", "val"):
        names = {p.name for p in (tmp_path / "Potsdam" / split / "images").glob("*.png")}
        assert names == {
            f"{t}_{y}_{x}.png" for t in TILES["potsdam"][split] for y in (0, 32) for x in (0, 32)
        }
    tile = tiles["6_7"]
    image, mask = _patch(tmp_path, "Potsdam", "train", "6_7", 32, 0)
    assert np.array_equal(image, tile["irrg"][32:64, 0:32])  # IRRG bands, not RGB
    classes, boundary = tile["classes"][32:64, 0:32], eroded(tile["classes"])[32:64, 0:32]
    assert boundary.any() and (~boundary).any()
    assert np.all(mask[boundary] == 255)  # eroded boundary (black in noBoundary labels) → ignore
    assert np.array_equal(mask[~boundary], classes[~boundary])  # colour map → class ids
    meta = json.loads((tmp_path / "Potsdam" / "prepare.json").read_text())
    assert meta["modality"] == "irrg" and meta["patch_size"] == PATCH


def test_prepare_full_labels_rgb_and_clutter_ignored(potsdam, tmp_path):
    src, tiles = potsdam
    prepare_isprs(
        src, tmp_path, "potsdam", "rgb", patch_size=PATCH, stride=PATCH, ignore_clutter=True, erode=False
    )
    tile = tiles["2_13"]
    image, mask = _patch(tmp_path, "Potsdam", "val", "2_13", 0, 32)
    classes = tile["classes"][0:32, 32:64]
    assert np.array_equal(image, tile["rgb"][0:32, 32:64])
    expected = np.where(classes == 5, 255, classes)
    assert (classes == 5).any() and np.array_equal(mask, expected)


def test_prepare_vaihingen_tells_images_from_same_named_labels(vaihingen, tmp_path):
    src, tiles = vaihingen
    counts = prepare_isprs(src, tmp_path, "vaihingen", patch_size=PATCH, stride=PATCH, erode=False)
    assert counts == {"train": 16 * 4, "val": 17 * 4}
    image, mask = _patch(tmp_path, "Vaihingen", "val", "38", 32, 32)
    assert np.array_equal(image, tiles["38"]["irrg"][32:, 32:])
    assert np.array_equal(mask, tiles["38"]["classes"][32:, 32:])
    with pytest.raises(ValueError, match="IRRG only"):
        prepare_isprs(src, tmp_path, "vaihingen", "rgb")


def test_overlapping_stride_and_padding(tmp_path):
    src = tmp_path / "src"
    write_isprs_tiles(src, "vaihingen", size=(40, 24), seed=2)
    counts = prepare_isprs(src, tmp_path / "out", "vaihingen", patch_size=32, stride=16, erode=False)
    assert counts["train"] == 16 * 2  # y in (0, 8), x in (0,) with padding to 32
    image, mask = _patch(tmp_path / "out", "Vaihingen", "train", "1", 8, 0)
    assert image.shape == (32, 32, 3) and np.all(mask[:, 24:] == 255) and np.all(image[:, 24:] == 0)


def test_missing_tile_names_the_file(tmp_path):
    src = tmp_path / "src"
    write_isprs_tiles(src, "potsdam", size=(32, 32), skip=("top_potsdam_7_13_label_noBoundary.tif",))
    with pytest.raises(DatasetNotFoundError, match="top_potsdam_7_13_label_noBoundary.tif"):
        prepare_isprs(src, tmp_path / "out", "potsdam", patch_size=32, stride=32)
    assert not (tmp_path / "out" / "Potsdam").exists()  # nothing written before all tiles are found
    prepare_isprs(
        src, tmp_path / "out", "potsdam", patch_size=32, stride=32, erode=False
    )  # full labels exist


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_tiff_is_named_and_the_previous_preparation_is_kept(potsdam, tmp_path, capsys, damage):
    """A corrupt tile found after other tiles were cut: DataError naming it (CLI exit 2); the patches
    prepared before stay exactly as they were and no partial patches or staging folder remain."""
    from lpcgma.cli import main

    src, _ = potsdam
    out = tmp_path / "out"
    prepare_isprs(src, out, "potsdam", patch_size=PATCH, stride=PATCH)
    before = _tree(out)
    bad_src = tmp_path / "src"
    shutil.copytree(src, bad_src)
    (bad,) = bad_src.rglob("top_potsdam_7_13_label_noBoundary.tif")  # the last val tile's label
    bad.write_bytes(bad.read_bytes()[:300] if damage == "truncated" else b"II*\x00 not a tiff")
    with pytest.raises(DataError, match=r"cannot read TIFF '.*top_potsdam_7_13_label_noBoundary\.tif' \(corrupt"):
        prepare_isprs(bad_src, out, "potsdam", patch_size=PATCH, stride=PATCH, ignore_clutter=True)
    assert _tree(out) == before  # not one patch or prepare.json replaced, nothing added
    fresh = tmp_path / "fresh"
    argv = ["data", "prepare-isprs", "--src", str(bad_src), "--out", str(fresh), "--dataset", "potsdam"]
    assert main([*argv, "--patch-size", str(PATCH)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (fresh / "Potsdam").exists()  # no half-prepared dataset to train on


def test_label_decoding_and_rejection_of_non_labels():
    classes = np.arange(6, dtype=np.uint8).reshape(2, 3)
    label = colour_label(classes)
    label[0, 0] = (0, 0, 0)  # boundary
    out = decode_isprs_label(label)
    assert out.tolist() == [[255, 1, 2], [3, 4, 5]]
    noisy = np.clip(colour_label(classes).astype(int) + 12, 0, 255).astype(np.uint8)  # near-pure colours
    assert decode_isprs_label(noisy).tolist() == [[0, 1, 2], [3, 4, 5]]
    photo = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="not ISPRS label colours"):
        decode_isprs_label(photo, "x.tif")


def test_read_tif_falls_back_to_tifffile(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    arr = np.random.default_rng(0).integers(0, 256, (3, 8, 10), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", arr, photometric="rgb", planarconfig="separate")

    def fail(*args, **kwargs):
        raise OSError("PIL cannot decode this")

    monkeypatch.setattr(isprs.Image, "open", fail)
    assert np.array_equal(read_tif(tmp_path / "planar.tif"), arr.transpose(1, 2, 0))
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.tif"):
        read_tif(tmp_path / "bad.tif")


def test_patches_dataset(potsdam, tmp_path):
    src, tiles = potsdam
    prepare_isprs(src, tmp_path, "potsdam", patch_size=PATCH, stride=PATCH)
    ds = ISPRSPatches(tmp_path, "potsdam", "val")
    assert len(ds) == 14 * 4 and ds.classes.num_classes == 6 and ds.meta["modality"] == "irrg"
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (32, 32) and s["name"] == "2_13_0_0"
    assert set(s["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    no_clutter = ISPRSPatches(tmp_path, "potsdam", "val", ignore_clutter=True)
    assert no_clutter.classes.num_classes == 5
    clutter = s["mask"] == 5
    assert clutter.any() and bool((no_clutter[0]["mask"][clutter] == 255).all())
    with pytest.raises(DatasetNotFoundError, match="prepare_isprs"):
        ISPRSPatches(tmp_path, "vaihingen", "train")
    (tmp_path / "Potsdam" / "prepare.json").unlink()  # as after a preparation interrupted mid-install
    with pytest.raises(DataError, match=r"Potsdam' has no prepare\.json.*prepare-isprs.*import-isprs"):
        ISPRSPatches(tmp_path, "potsdam", "val")
