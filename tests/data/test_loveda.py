import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.loveda import LoveDA, remap_loveda_mask, sample_loveda

from .fixtures import write_loveda_split


def _expected_mask(raw: np.ndarray) -> np.ndarray:
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    return out


def test_reads_official_layout_in_numeric_id_order(tmp_path):
    tiles = write_loveda_split(tmp_path, "Val", "Urban", ids=(10, 2, 0, 1))
    ds = LoveDA(tmp_path, "val", "urban")
    assert len(ds) == 4
    assert [ds[i]["name"] for i in range(4)] == ["0", "1", "2", "10"]
    s = ds[3]
    image, raw = tiles[10]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 32, 32)
    assert np.array_equal(s["image"].numpy().transpose(1, 2, 0), image)
    assert s["mask"].dtype == torch.int64
    assert np.array_equal(s["mask"].numpy(), _expected_mask(raw))


def test_test_split_has_all_ignore_masks(tmp_path):
    write_loveda_split(tmp_path, "Test", "Rural", ids=(5,), masks=False)
    s = LoveDA(tmp_path, "test", "rural")[0]
    assert s["mask"].shape == (32, 32) and bool((s["mask"] == 255).all())


def test_missing_folder_says_what_to_download_and_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        LoveDA(tmp_path / "loveda", "train", "rural")
    msg = str(e.value)
    assert str(tmp_path / "loveda" / "Train" / "Rural" / "images_png") in msg
    assert "5706578" in msg and "Train.zip" in msg and "Zenodo" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_masks_folder(tmp_path):
    write_loveda_split(tmp_path, masks=False)
    with pytest.raises(DatasetNotFoundError, match="masks_png"):
        LoveDA(tmp_path, "train", "rural")


def test_image_without_mask_is_reported_eagerly(tmp_path):
    write_loveda_split(tmp_path)
    (tmp_path / "Train" / "Rural" / "masks_png" / "2.png").unlink()
    with pytest.raises(DataError, match=r"masks_png/2\.png"):
        LoveDA(tmp_path, "train", "rural")


def test_empty_split(tmp_path):
    (tmp_path / "Train" / "Rural" / "images_png").mkdir(parents=True)
    (tmp_path / "Train" / "Rural" / "masks_png").mkdir()
    with pytest.raises(DataError, match="empty split"):
        LoveDA(tmp_path, "train", "rural")


def test_size_mismatch_names_both_files(tmp_path):
    write_loveda_split(tmp_path)
    Image.fromarray(np.ones((16, 32), dtype=np.uint8)).save(
        tmp_path / "Train" / "Rural" / "masks_png" / "1.png"
    )
    ds = LoveDA(tmp_path, "train", "rural")  # lazily validated
    ds[0]
    with pytest.raises(DataError, match=r"masks_png/1\.png.*32x16.*images_png/1\.png.*32x32"):
        ds[1]


@pytest.mark.parametrize("bad", [8, 200])
def test_mask_value_out_of_range(tmp_path, bad):
    write_loveda_split(tmp_path)
    raw = np.ones((32, 32), dtype=np.uint8)
    raw[3, 4] = bad
    Image.fromarray(raw).save(tmp_path / "Train" / "Rural" / "masks_png" / "0.png")
    with pytest.raises(DataError, match=rf"masks_png/0\.png.*invalid values \[{bad}\]"):
        LoveDA(tmp_path, "train", "rural")[0]


def test_rgb_mask_is_rejected(tmp_path):
    write_loveda_split(tmp_path)
    Image.fromarray(np.ones((32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "Train" / "Rural" / "masks_png" / "0.png"
    )
    with pytest.raises(DataError, match="single-channel"):
        LoveDA(tmp_path, "train", "rural")[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png(tmp_path, damage):
    write_loveda_split(tmp_path)
    path = tmp_path / "Train" / "Rural" / "images_png" / "1.png"
    data = path.read_bytes()
    path.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    ds = LoveDA(tmp_path, "train", "rural")
    with pytest.raises(DataError, match=r"cannot read PNG .*images_png/1\.png"):
        ds[1]


def test_sample_copies_evenly_spread_tiles_in_the_official_layout(tmp_path):
    tiles = write_loveda_split(tmp_path / "full", ids=tuple(range(9)))
    ids = sample_loveda(tmp_path / "full", tmp_path / "sample", 3)
    assert ids == ["0", "4", "8"]  # first, middle and last of the numeric ids
    ds = LoveDA(tmp_path / "sample", "train", "rural")
    assert [ds[i]["name"] for i in range(3)] == ids
    assert np.array_equal(ds[1]["image"].numpy().transpose(1, 2, 0), tiles[4][0])
    assert np.array_equal(ds[1]["mask"].numpy(), _expected_mask(tiles[4][1]))
    with pytest.raises(ValueError, match="already holds tiles"):  # never mixed into an existing sample
        sample_loveda(tmp_path / "full", tmp_path / "sample", 3)


def test_sample_refuses_bad_input_before_writing(tmp_path):
    write_loveda_split(tmp_path / "full", ids=(0, 1, 2))
    with pytest.raises(ValueError, match=r"--tiles 4: expected 1 to 3"):
        sample_loveda(tmp_path / "full", tmp_path / "out", 4)
    bad = tmp_path / "full" / "Train" / "Rural" / "masks_png" / "2.png"
    Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(bad)  # not a LoveDA class value
    with pytest.raises(DataError, match=r"masks_png/2\.png"):
        sample_loveda(tmp_path / "full", tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()  # nothing written from a sample that would not load
    with pytest.raises(DatasetNotFoundError):
        sample_loveda(tmp_path / "nowhere", tmp_path / "out", 3)


def test_invalid_split_or_domain(tmp_path):
    with pytest.raises(ValueError):
        LoveDA(tmp_path, "training", "rural")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=st.integers(0, 7)))
def test_remap_matches_the_definition(raw):
    out = remap_loveda_mask(raw)
    assert out.dtype == np.int64 and out.shape == raw.shape
    assert np.array_equal(out[raw == 0], np.full(int((raw == 0).sum()), 255))
    assert np.array_equal(out[raw > 0], raw[raw > 0].astype(np.int64) - 1)
    assert set(np.unique(out)) <= set(range(7)) | {255}


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint16, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 300)),
)
def test_remap_rejects_exactly_the_out_of_range_values(raw):
    if raw.max() <= 7:
        assert np.array_equal(remap_loveda_mask(raw), _expected_mask(raw))
    else:
        with pytest.raises(DataError, match=str(int(raw[raw > 7].min()))):
            remap_loveda_mask(raw)


def test_real_loveda_sample(loveda_sample):
    ds = LoveDA(loveda_sample, "train", "rural")
    assert len(ds) == 16
    assert [p.stem for p in ds.images] == [str(i) for i in range(16)]
    s = ds[1]
    assert s["image"].shape == (3, 1024, 1024) and s["mask"].shape == (1024, 1024)
    raw = np.asarray(Image.open(loveda_sample / "Train" / "Rural" / "masks_png" / "1.png"))
    assert np.array_equal(s["mask"].numpy(), _expected_mask(raw))
    assert set(np.unique(s["mask"].numpy())) <= set(range(7)) | {255}


def test_sample_of_the_real_tiles_reads_back_identically(loveda_sample, tmp_path):
    ids = sample_loveda(loveda_sample, tmp_path / "s", 2)
    full, part = LoveDA(loveda_sample, "train", "rural"), LoveDA(tmp_path / "s", "train", "rural")
    assert [part[i]["name"] for i in range(len(part))] == ids and len(ids) == 2
    last = full[len(full) - 1]
    assert part[1]["name"] == last["name"] and torch.equal(part[1]["mask"], last["mask"])
