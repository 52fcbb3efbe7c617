"""mmsegmentation-prepared ISPRS patches: refused as they are, imported with their labels remapped."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcgma.cli import main
from lpcgma.data import isprs_mmseg
from lpcgma.data.classes import ISPRS_CLASSES
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import ISPRSPatches, prepare_isprs
from lpcgma.data.isprs_mmseg import (
    MMSEG_CLASSES,
    import_mmseg_isprs,
    lpcgma_patch_name,
    mmseg_to_lpcgma_labels,
)

from .fixtures import MMSEG_LABEL_COLOURS, colour_label, mmseg_label, write_isprs_tiles, write_mmseg_isprs


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mmseg_potsdam(tmp_path_factory):
    src = tmp_path_factory.mktemp("mmseg_potsdam")
    return src, write_mmseg_isprs(src, "potsdam")


def test_remap_table_value_by_value():
    expected = {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5}
    for value, class_id in expected.items():
        assert mmseg_to_lpcgma_labels(np.array([[value]], dtype=np.uint8)).tolist() == [[class_id]]
    for value in range(1, 7):  # the same class: by name, and by the colour the converter read it from
        class_id = expected[value]
        assert ISPRS_CLASSES.names[class_id].replace(" ", "_").rstrip("s") == MMSEG_CLASSES[value - 1]
        assert ISPRS_CLASSES.palette[class_id] == MMSEG_LABEL_COLOURS[value]
    classes = np.arange(6, dtype=np.uint8).reshape(2, 3)
    boundary = np.array([[True, False, False], [False, False, True]])
    out = mmseg_to_lpcgma_labels(mmseg_label(colour_label(classes, boundary)))
    assert out.dtype == np.uint8 and out.tolist() == [[255, 1, 2], [3, 4, 255]]


@pytest.mark.parametrize("value", [7, 100, 255])
def test_unexpected_label_values_are_named(value):
    label = np.array([[0, 1], [6, value]], dtype=np.uint8)
    with pytest.raises(DataError, match=rf"label 'x\.png' holds value\(s\) \[{value}\]: mmseg ISPRS labels are 0"):
        mmseg_to_lpcgma_labels(label, "x.png")
    if value == 255:
        with pytest.raises(DataError, match="already remapped"):
            mmseg_to_lpcgma_labels(label)
    with pytest.raises(DataError, match="dtype float32"):
        mmseg_to_lpcgma_labels(label.astype(np.float32))


def test_patch_names_follow_prepare_isprs():
    assert lpcgma_patch_name("2_10_256_512_768_1024") == "2_10_512_256"  # x0=256, y0=512 → <tile>_<y>_<x>
    assert lpcgma_patch_name("area11_0_16_32_48") == "11_16_0"
    assert lpcgma_patch_name("custom") == "custom"


def test_import_end_to_end_masks_are_the_lpcgma_labels(mmseg_potsdam, tmp_path):
    src, written = mmseg_potsdam
    report = import_mmseg_isprs(src, tmp_path, "potsdam", "irrg")
    assert report.per_split == {"train": 18, "val": 18} and report.patches == 36 and report.skipped == []
    assert 0 < report.ignore_fraction < 1 and report.root == tmp_path / "Potsdam"
    for split in ("train", "val"):
        ds = ISPRSPatches(tmp_path, "potsdam", split)
        assert ds.meta["source"] == "mmseg" and ds.meta["modality"] == "irrg" and ds.meta["patch_size"] == 32
        by_name = {lpcgma_patch_name(n): v for n, v in written[split].items()}
        assert len(ds) == len(by_name)
        boundary_seen = 0
        for i in range(len(ds)):
            s = ds[i]
            image, expected = by_name[s["name"]]
            assert np.array_equal(s["image"].numpy().transpose(1, 2, 0), image)
            assert np.array_equal(s["mask"].numpy(), expected)  # boundary (mmseg 0) → 255, k → k - 1
            boundary_seen += int((expected == 255).sum())
        assert boundary_seen > 0
    clutter = ISPRSPatches(tmp_path, "potsdam", "val", ignore_clutter=True)
    assert clutter.classes.num_classes == 5 and 5 not in clutter[0]["mask"].unique().tolist()


def test_copied_mmseg_patches_are_refused_naming_the_folder_and_both_commands(mmseg_potsdam, tmp_path):
    """The issue's case: mmseg's img_dir/ann_dir copied into the prepared layout, no manifest."""
    src, _ = mmseg_potsdam
    for split in ("train", "val"):
        shutil.copytree(src / "img_dir" / split, tmp_path / "Potsdam" / split / "images")
        shutil.copytree(src / "ann_dir" / split, tmp_path / "Potsdam" / split / "masks")
    folder = tmp_path / "Potsdam"
    with pytest.raises(DataError, match="has no prepare.json") as e:
        ISPRSPatches(tmp_path, "potsdam", "train")
    assert f"'{folder}'" in str(e.value)
    assert "lpcgma data prepare-isprs" in str(e.value) and "lpcgma data import-isprs --from mmseg" in str(e.value)
    (folder / "prepare.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the manifest"):
        ISPRSPatches(tmp_path, "potsdam", "train")


def test_another_dataset_s_manifest_is_refused(tmp_path):
    src = tmp_path / "mmseg"
    write_mmseg_isprs(src, "vaihingen", {"train": ("1",)})
    import_mmseg_isprs(src, tmp_path / "out", "vaihingen")
    shutil.copytree(tmp_path / "out" / "Vaihingen", tmp_path / "out" / "Potsdam")
    assert len(ISPRSPatches(tmp_path / "out", "vaihingen", "train")) == 9
    with pytest.raises(DataError, match=r"names dataset 'vaihingen', not 'potsdam'.*import-isprs"):
        ISPRSPatches(tmp_path / "out", "potsdam", "train")


def test_an_mmseg_root_given_as_data_root_names_the_import_command(mmseg_potsdam):
    src, _ = mmseg_potsdam
    with pytest.raises(DatasetNotFoundError, match="holds mmsegmentation's layout") as e:
        ISPRSPatches(src, "potsdam", "train")
    assert f"lpcgma data import-isprs --from mmseg {src} --out DIR --dataset potsdam" in str(e.value)


def test_cli_imports_and_prints_one_line(tmp_path, capsys):
    src = tmp_path / "mmseg"
    write_mmseg_isprs(src, "vaihingen", {"train": ("1",), "val": ("2",)})
    (src / "img_dir" / "train" / ".DS_Store").write_bytes(b"x")
    (src / "img_dir" / "test").mkdir()
    assert main(["data", "import-isprs", "--from", "mmseg", str(src), "--out", str(tmp_path / "out"),
                 "--dataset", "vaihingen"]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "imported 18 mmseg patches (train 9, val 9)" in out[0] and "skipped 2" in out[0]
    ds = ISPRSPatches(tmp_path / "out", "vaihingen", "val")
    assert ds.meta["modality"] == "irrg" and ds[0]["name"] == "2_0_0"


def _bad_label(src: Path) -> str:
    path = sorted((src / "ann_dir" / "val").glob("*.png"))[-1]
    label = np.asarray(Image.open(path)).copy()
    label[3, 4] = 9
    Image.fromarray(label).save(path)
    return f"'{path}' holds value(s) [9]"


def _corrupt_image(src: Path) -> str:
    path = sorted((src / "img_dir" / "val").glob("*.png"))[-1]
    path.write_bytes(path.read_bytes()[:100])
    return f"cannot read PNG '{path}'"


def _orphan_image(src: Path) -> str:
    path = sorted((src / "ann_dir" / "train").glob("*.png"))[0]
    path.unlink()
    return f"'{path}' is missing"


def _wrong_size(src: Path) -> str:
    path = sorted((src / "ann_dir" / "train").glob("*.png"))[1]
    Image.fromarray(np.ones((16, 32), dtype=np.uint8)).save(path)
    return f"label '{path}' is 32x16 but image"


def _grey_image(src: Path) -> str:
    path = sorted((src / "img_dir" / "train").glob("*.png"))[2]
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(path)
    return f"image '{path}' is a L image: expected 3 bands"


@pytest.mark.parametrize(
    "damage",
    [_bad_label, _corrupt_image, _orphan_image, _wrong_size, _grey_image],
    ids=["bad-label-value", "corrupt-png", "image-without-label", "size-mismatch", "grey-image"],
)
def test_a_bad_patch_is_named_exit_2_and_nothing_is_written(mmseg_potsdam, tmp_path, capsys, damage):
    src = tmp_path / "mmseg"
    shutil.copytree(mmseg_potsdam[0], src)
    words = damage(src)
    out = tmp_path / "out"
    argv = ["data", "import-isprs", "--from", "mmseg", str(src), "--out", str(out), "--dataset", "potsdam"]
    assert main([*argv, "--modality", "rgb"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (out / "Potsdam").exists()  # no half-prepared root to train on


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from", "torchgeo", "SRC", "--dataset", "potsdam", "--modality", "rgb"], "--from 'torchgeo' is invalid"),
        (["--from", "mmseg", "SRC", "--dataset", "isaid", "--modality", "rgb"], "--dataset 'isaid' is invalid"),
        (["--from", "mmseg", "SRC", "--dataset", "potsdam", "--modality", "nir"], "--modality 'nir' is invalid"),
        (["--from", "mmseg", "SRC", "--dataset", "potsdam"], "say which bands the mmseg Potsdam images hold"),
        (["--from", "mmseg", "SRC", "--dataset", "vaihingen", "--modality", "rgb"], "IRRG only"),
        (["--from", "mmseg", "NOWHERE", "--dataset", "vaihingen"], "'NOWHERE' does not exist: expected SRC/img_dir"),
        (["--from", "mmseg", "SRC/img_dir", "--dataset", "vaihingen"], "img_dir/img_dir' not found: expected"),
    ],
    ids=["from", "dataset", "modality", "potsdam-modality", "vaihingen-rgb", "missing-src", "not-the-layout"],
)
def test_cli_bad_input_is_one_line_exit_2_before_anything_is_written(mmseg_potsdam, tmp_path, capsys, args, words):
    src = mmseg_potsdam[0]
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")).replace("SRC", str(src)) for a in args]
    words = words.replace("NOWHERE", str(tmp_path / "nowhere"))
    assert main(["data", "import-isprs", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lpcgma: error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_import_leaves_no_prepared_root_and_keeps_a_previous_one(mmseg_potsdam, tmp_path, monkeypatch):
    src, _ = mmseg_potsdam
    calls = {"n": 0}
    real_read_png = isprs_mmseg.read_png

    def interrupt_on_the_30th_label(path, mode):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real_read_png(path, mode)

    monkeypatch.setattr(isprs_mmseg, "read_png", interrupt_on_the_30th_label)
    with pytest.raises(KeyboardInterrupt):
        import_mmseg_isprs(src, tmp_path / "first", "potsdam", "rgb")
    assert calls["n"] == 30 and not (tmp_path / "first").joinpath("Potsdam").exists()

    # over a previous preparation: byte for byte as it was, no staging folder left
    tiles = tmp_path / "tiles"
    write_isprs_tiles(tiles, "potsdam", size=(32, 32))
    prepare_isprs(tiles, tmp_path / "prepared", "potsdam", patch_size=32)
    before = _tree(tmp_path / "prepared")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        import_mmseg_isprs(src, tmp_path / "prepared", "potsdam", "rgb")
    assert _tree(tmp_path / "prepared") == before
    assert json.loads((tmp_path / "prepared" / "Potsdam" / "prepare.json").read_text())["patch_size"] == 32

    # a complete import then replaces it, stale splits and manifest included
    monkeypatch.undo()
    only_train = tmp_path / "only_train"
    write_mmseg_isprs(only_train, "potsdam", {"train": ("6_7",)})
    import_mmseg_isprs(only_train, tmp_path / "prepared", "potsdam", "rgb")
    root = tmp_path / "prepared" / "Potsdam"
    assert sorted(p.name for p in root.iterdir()) == ["prepare.json", "train"]
    assert json.loads((root / "prepare.json").read_text())["source"] == "mmseg"
    assert len(ISPRSPatches(tmp_path / "prepared", "potsdam", "train")) == 9
