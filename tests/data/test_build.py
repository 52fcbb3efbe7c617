import pytest
import torch

from lpcgma.config import ConfigError, DataConfig
from lpcgma.data.build import build_datasets
from lpcgma.data.classes import IMAGENET_MEAN, IMAGENET_STD, ISPRS_CLASSES, LOVEDA_CLASSES
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import ISPRSPatches, prepare_isprs
from lpcgma.data.loveda import LoveDA
from lpcgma.data.synthetic import SyntheticAerial

from .fixtures import write_isprs_tiles, write_loveda_split


def test_synthetic_protocol():
    cfg = DataConfig(synthetic_tiles=5, synthetic_tile_size=32, synthetic_seed=3, eval_max_tiles=2)
    data = build_datasets(cfg)
    src, tgt = data.source_train, data.target_train
    assert isinstance(src, SyntheticAerial) and isinstance(tgt, SyntheticAerial)
    assert (src.domain, src.split, src.sensor) == ("rural", "train", "rgb")
    assert (tgt.domain, tgt.split, tgt.sensor) == ("urban", "val", "irrg")
    assert len(src) == 5 and src.tile_size == 32 and src.seed == 3
    assert data.target_eval.dataset is data.target_train  # type: ignore[attr-defined]  # val = val: shared
    assert [data.target_eval[i]["name"] for i in range(len(data.target_eval))] == [
        "urban_val_00000",
        "urban_val_00001",
    ]
    assert len(data.source_eval) == 2 and data.source_eval[0]["name"] == "rural_val_00000"
    assert data.classes == LOVEDA_CLASSES and data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    rgb = build_datasets(
        DataConfig(synthetic_tiles=2, synthetic_target_sensor="rgb", target_train_split="train")
    )
    assert rgb.target_train.sensor == "rgb" and rgb.target_train.split == "train"  # type: ignore[attr-defined]
    assert rgb.target_train is not rgb.target_eval and rgb.target_eval.split == "val"  # type: ignore[attr-defined]


def test_eval_max_tiles_zero_keeps_everything():
    data = build_datasets(DataConfig(synthetic_tiles=3, synthetic_tile_size=16))
    assert len(data.target_eval) == 3 and isinstance(data.target_eval, SyntheticAerial)


def test_loveda(tmp_path):
    for split in ("Train", "Val"):
        for domain in ("Rural", "Urban"):
            write_loveda_split(tmp_path, split, domain, ids=(0, 1, 2))
    write_loveda_split(tmp_path, "Test", "Urban", ids=(0,), masks=False)
    data = build_datasets(DataConfig(dataset="loveda", root=str(tmp_path), target_eval_split="test"))
    assert isinstance(data.source_train, LoveDA) and isinstance(data.target_eval, LoveDA)
    assert (data.source_train.split, data.source_train.domain) == ("train", "rural")
    assert (data.target_train.split, data.target_train.domain) == ("val", "urban")  # type: ignore[attr-defined]
    assert data.target_eval.split == "test" and bool((data.target_eval[0]["mask"] == 255).all())
    assert data.classes == LOVEDA_CLASSES


def test_cached_tiles_decode_each_tile_once_and_hand_out_copies(tmp_path, monkeypatch):
    write_loveda_split(tmp_path, "Train", "Rural", ids=(0, 1, 2))
    reads: list[int] = []
    original = LoveDA.__getitem__

    def counting(self, index):
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(LoveDA, "__getitem__", counting)
    cfg = DataConfig(
        dataset="loveda", root=str(tmp_path), source_domain="rural", target_domain="rural_irrg",
        target_train_split="train", target_eval_split="train", source_eval_split="train", cache_tiles=True,
    )
    data = build_datasets(cfg)
    assert data.source_train.split == "train" and len(data.source_train) == 3  # attributes pass through
    first = data.source_train[1]
    first["image"].zero_()  # a transform writing in place must not reach the cache
    again = data.source_train[1]
    assert torch.equal(again["image"], original(data.source_train.tiles, 1)["image"])
    assert again["image"].any() and again["name"] == first["name"]
    irrg = [data.target_train[1]["image"] for _ in range(2)]  # the sensor model too runs once
    assert torch.equal(irrg[0], irrg[1])
    assert reads == [1, 1]  # one read for the RGB set, one for the IRRG set; none when served again
    plain = build_datasets(DataConfig(**{**cfg.__dict__, "cache_tiles": False}))
    assert torch.equal(plain.target_train[1]["image"], irrg[0])


def test_loveda_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        build_datasets(DataConfig(dataset="loveda"))
    with pytest.raises(DatasetNotFoundError, match="Zenodo"):
        build_datasets(DataConfig(dataset="loveda", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.target_domain"):
        build_datasets(DataConfig(dataset="loveda", root=str(tmp_path), target_domain="vaihingen"))


def test_isprs(tmp_path):
    for dataset in ("potsdam", "vaihingen"):
        write_isprs_tiles(tmp_path / "src", dataset, size=(32, 32))
        prepare_isprs(tmp_path / "src", tmp_path / "out", dataset, patch_size=32, stride=32)  # type: ignore[arg-type]
    cfg = DataConfig(dataset="isprs", root=str(tmp_path / "out"), source_domain="potsdam",
                     target_domain="vaihingen", target_train_split="train", eval_max_tiles=5)  # fmt: skip
    data = build_datasets(cfg)
    assert isinstance(data.source_train, ISPRSPatches) and data.source_train.dataset == "potsdam"
    assert len(data.source_train) == 24 and len(data.target_train) == 16 and len(data.target_eval) == 5
    assert data.classes == ISPRS_CLASSES and data.target_eval[0]["image"].dtype == torch.uint8
    five = build_datasets(DataConfig(**{**cfg.__dict__, "isprs_ignore_clutter": True}))
    assert five.classes.num_classes == 5
    with pytest.raises(DataError, match="isprs_modality"):
        build_datasets(DataConfig(**{**cfg.__dict__, "isprs_modality": "rgb"}))
    with pytest.raises(ConfigError, match="test"):
        build_datasets(DataConfig(**{**cfg.__dict__, "target_eval_split": "test"}))


def test_shards_need_a_packed_location(tmp_path):  # round trips: test_shards.py
    with pytest.raises(DatasetNotFoundError, match="lpcgma data pack"):
        build_datasets(DataConfig(dataset="shards", root=str(tmp_path)))
