"""Parquet shards: pack → read round trips (local and a real moto S3 server), manifest validation, and
the trainer reading the same samples from shards as from the folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from server_helpers import MotoServer
from tiny_config import tiny_overrides

from lpcgma.cli import main
from lpcgma.config import ConfigError, DataConfig, load_config
from lpcgma.data.build import build_datasets
from lpcgma.data.classes import ISPRS_CLASSES_NO_CLUTTER
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import prepare_isprs
from lpcgma.data.loveda import LoveDA
from lpcgma.data.pack import pack_dataset
from lpcgma.data.sampling import class_histograms
from lpcgma.data.shards import (
    INDEX_FILE,
    MANIFEST_FILE,
    ShardDataset,
    read_manifest,
)
from lpcgma.data.stream import TrainStream
from lpcgma.data.transforms import TrainTransform
from lpcgma.engine.trainer import Trainer
from lpcgma.storage import Location

from .fixtures import write_isprs_tiles, write_loveda_split

SYNTH = DataConfig(synthetic_tiles=3, synthetic_tile_size=32)
SETS = ("source_train", "target_train", "target_eval", "source_eval")


def assert_same_samples(a: Any, b: Any) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() == {"image", "mask", "name"}
        assert x["name"] == y["name"], i
        assert x["image"].dtype == y["image"].dtype == torch.uint8 and torch.equal(x["image"], y["image"]), x["name"]
        assert x["mask"].dtype == y["mask"].dtype == torch.int64 and torch.equal(x["mask"], y["mask"]), x["name"]


def shard_rows(root: Path) -> list[dict[str, Any]]:
    """Every row of every shard listed by the manifest, in manifest order."""
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    return [row for s in manifest["shards"] for row in pq.read_table(root / s["file"]).to_pylist()]


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shards"
    pack_dataset(SYNTH, out, shard_rows=4)
    return out


# ------------------------------------------------------------------------------------ round trips
def test_loveda_round_trip_keeps_the_files_bytes(tmp_path: Path) -> None:
    write_loveda_split(tmp_path / "src", "Train", "Rural", ids=(0, 1, 2, 10))
    write_loveda_split(tmp_path / "src", "Val", "Urban", ids=(3, 4), seed=1)
    write_loveda_split(tmp_path / "src", "Test", "Urban", ids=(5,), masks=False, seed=2)
    logs: list[str] = []
    m = pack_dataset(
        DataConfig(dataset="loveda", root=str(tmp_path / "src")), tmp_path / "out", shard_rows=3, log=logs.append
    )
    assert m.counts == {"rural": {"train": 4}, "urban": {"val": 2, "test": 1}}
    assert m.labelled == {"rural": {"train": True}, "urban": {"val": True, "test": False}}
    assert [s.rows for s in m.shards] == [3, 3, 1] and any("rural/train: 4 tiles" in line for line in logs)
    assert read_manifest(tmp_path / "out").to_json() == json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())

    rows = shard_rows(tmp_path / "out")
    assert [(r["domain"], r["split"], r["tile_id"]) for r in rows] == [
        ("rural", "train", "0"), ("rural", "train", "1"), ("rural", "train", "2"), ("rural", "train", "10"),
        ("urban", "val", "3"), ("urban", "val", "4"), ("urban", "test", "5"),
    ]  # fmt: skip
    for r in rows:  # the PNG files as they are on disk, not re-encoded
        folder = tmp_path / "src" / r["split"].capitalize() / r["domain"].capitalize()
        assert r["image"] == (folder / "images_png" / f"{r['tile_id']}.png").read_bytes()
        masks = folder / "masks_png" / f"{r['tile_id']}.png"
        assert r["mask"] == (masks.read_bytes() if masks.is_file() else None)

    for domain, split in (("rural", "train"), ("urban", "val"), ("urban", "test")):
        folder, shards = LoveDA(tmp_path / "src", split, domain), ShardDataset(tmp_path / "out", domain, split)  # type: ignore[arg-type]
        assert_same_samples(folder, shards)
        assert shards.tile_ids() == [p.stem for p in folder.images]
        assert np.array_equal(shards.tile_class_histograms(), class_histograms(folder, 7))
    assert bool((ShardDataset(tmp_path / "out", "urban", "test")[0]["mask"] == 255).all())


def test_isprs_round_trip_with_and_without_clutter(tmp_path: Path) -> None:
    for dataset in ("potsdam", "vaihingen"):
        write_isprs_tiles(tmp_path / "src", dataset, size=(32, 32))
        prepare_isprs(tmp_path / "src", tmp_path / "prepared", dataset, patch_size=32)  # type: ignore[arg-type]
    m = pack_dataset(DataConfig(dataset="isprs", root=str(tmp_path / "prepared")), tmp_path / "out")
    assert m.counts == {"potsdam": {"train": 24, "val": 14}, "vaihingen": {"train": 16, "val": 17}}
    assert m.meta["potsdam"]["modality"] == "irrg" and len(m.shards) == 1
    folder = DataConfig(dataset="isprs", root=str(tmp_path / "prepared"), source_domain="potsdam",
                        target_domain="vaihingen", target_train_split="train")  # fmt: skip
    for clutter in (False, True):
        a = build_datasets(replace(folder, isprs_ignore_clutter=clutter))
        b = build_datasets(replace(folder, dataset="shards", root=str(tmp_path / "out"), isprs_ignore_clutter=clutter))
        assert a.classes == b.classes and (a.mean, a.std) == (b.mean, b.std)
        for name in SETS:
            assert_same_samples(getattr(a, name), getattr(b, name))
        assert np.array_equal(class_histograms(a.source_train), class_histograms(b.source_train))
    assert b.classes == ISPRS_CLASSES_NO_CLUTTER and b.source_train.tile_class_histograms().shape == (24, 5)  # type: ignore[attr-defined]
    with pytest.raises(DataError, match=r"out' holds irrg patches but data.isprs_modality=rgb: .* and pack them"):
        build_datasets(replace(folder, dataset="shards", root=str(tmp_path / "out"), isprs_modality="rgb"))


def test_synthetic_shards_match_the_generator(synth_shards: Path) -> None:
    m = read_manifest(synth_shards)
    assert m.dataset == "synthetic" and m.domains == ("rural", "urban") and len(m.shards) == 5  # 18 tiles, 4 a shard
    assert m.meta["urban"]["sensor"] == "irrg" and m.meta["rural"]["sensor"] == "rgb"
    a, b = build_datasets(SYNTH), build_datasets(DataConfig(dataset="shards", root=str(synth_shards)))
    assert a.classes == b.classes
    for name in SETS:
        assert_same_samples(getattr(a, name), getattr(b, name))


def test_unlabelled_target_reads_no_masks(tmp_path: Path) -> None:
    write_loveda_split(tmp_path / "src", "Train", "Rural", ids=(0, 1))
    write_loveda_split(tmp_path / "src", "Val", "Urban", ids=(2, 3), seed=1)
    pack_dataset(DataConfig(dataset="loveda", root=str(tmp_path / "src")), tmp_path / "out")
    folder = DataConfig(dataset="loveda", root=str(tmp_path / "src"), source_eval_split="train", target_labels=False)
    a, b = build_datasets(folder), build_datasets(replace(folder, dataset="shards", root=str(tmp_path / "out")))
    assert isinstance(b.target_train, ShardDataset) and not b.target_train.labelled
    for name in SETS:
        assert_same_samples(getattr(a, name), getattr(b, name))
    assert bool((b.target_eval[0]["mask"] == 255).all()) and not b.target_train.tile_class_histograms().any()
    assert b.source_train.labelled and b.source_train.tile_class_histograms().any()  # type: ignore[attr-defined]


def test_shard_size_cap_in_megabytes(tmp_path: Path) -> None:
    m = pack_dataset(SYNTH, tmp_path, shard_mb=1e-6, shard_rows=0)  # smaller than any tile: one tile a shard
    assert len(m.shards) == 18 and all(s.rows == 1 and s.bytes > 0 for s in m.shards)
    assert ShardDataset(m, "urban", "test")[2]["name"] == "urban_test_00002"


def test_repacking_replaces_the_older_pack(tmp_path: Path) -> None:
    pack_dataset(SYNTH, tmp_path, shard_rows=1)
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 18
    m = pack_dataset(replace(SYNTH, synthetic_tiles=1), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard-*.parquet")) == ["shard-00000.parquet"]
    assert read_manifest(tmp_path).counts == m.counts and m.counts["rural"] == {"train": 1, "val": 1, "test": 1}


def test_an_interrupted_pack_leaves_no_manifest(tmp_path: Path) -> None:
    write_loveda_split(tmp_path / "src", ids=(0, 1, 2))
    cfg = DataConfig(dataset="loveda", root=str(tmp_path / "src"))
    pack_dataset(cfg, tmp_path / "out")
    (tmp_path / "src" / "Train" / "Rural" / "images_png" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"images_png/2\.png"):
        pack_dataset(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()  # the older manifest went first
    with pytest.raises(DatasetNotFoundError, match=r"no shards manifest .*lpcgma data pack"):
        build_datasets(DataConfig(dataset="shards", root=str(tmp_path / "out")))


# ----------------------------------------------------------------------------------- validation
def _edit(root: Path, edit: Any) -> None:
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    edit(manifest)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=2), r"'format_version' = 2 .*expected 1"),
        (lambda m: m.update(dataset="cityscapes"), r"'dataset' = 'cityscapes' .*expected one of"),
        (lambda m: m.pop("counts"), r"'counts' = None .*lpcgma data pack"),
        (lambda m: m["classes"].reverse(), r"'classes' = \['agriculture'"),
        (lambda m: m["counts"]["rural"].update(train=4), r"'counts.rural.train' = 4 .*the 3 rows"),
        (lambda m: m["counts"]["urban"].update(eval=1), r"'counts.urban' = .*split \(train\|val\|test\)"),
        (lambda m: m["mask_lut"].update({"9": 12}), r"'mask_lut.9' = 12"),
        (lambda m: m["shards"][0].update(file="../x.parquet"), r"'shards\[0\]' = .*shard-NNNNN"),
        (lambda m: m["labelled"]["rural"].pop("val"), r"'labelled.rural.val' = None"),
        (lambda m: m["counts"]["rural"].update(train="3"), r"'counts.rural.train' = '3' .*valid integer"),  # strict
        (lambda m: m["shards"][0]["parts"][0].update(rows=0), r"'shards\[0\].parts\[0\]' = \{.*rows > 0"),
    ],
)
def test_manifest_errors_name_the_key_and_value(synth_shards: Path, tmp_path: Path, edit: Any, match: str) -> None:
    for f in synth_shards.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _edit(tmp_path, edit)
    with pytest.raises(DataError, match=match) as e:
        build_datasets(DataConfig(dataset="shards", root=str(tmp_path)))
    assert str(tmp_path / MANIFEST_FILE) in str(e.value)


def test_broken_manifest_and_missing_index(synth_shards: Path, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text((synth_shards / MANIFEST_FILE).read_text())
    ds = ShardDataset(tmp_path, "rural", "train")  # shards are opened lazily
    with pytest.raises(DataError, match=rf"cannot open shard '{tmp_path}/shard-00000\.parquet'"):
        ds[0]
    with pytest.raises(DataError, match=INDEX_FILE):
        ds.tile_class_histograms()


def test_config_errors_name_the_key(synth_shards: Path, tmp_path: Path) -> None:
    shards = DataConfig(dataset="shards", root=str(synth_shards))
    with pytest.raises(ConfigError, match=r"'data.root' is empty: .*shards folder or s3://"):
        build_datasets(replace(shards, root=""))
    with pytest.raises(ConfigError, match=r"'data.root' = 'http://host/x' is invalid: .*s3://bucket/prefix"):
        build_datasets(replace(shards, root="http://host/x"))
    with pytest.raises(ConfigError, match=r"'data.source_domain' = 'potsdam' .*\['rural', 'urban'\] \(the domains"):
        build_datasets(replace(shards, source_domain="potsdam"))
    with pytest.raises(ConfigError, match=r"'data.root' = 's3://b/x' .*data.dataset=shards"):
        build_datasets(DataConfig(dataset="loveda", root="s3://b/x"))
    write_loveda_split(tmp_path / "src", ids=(0, 1))  # Train/Rural only, as the LoveDA sample
    pack_dataset(DataConfig(dataset="loveda", root=str(tmp_path / "src")), tmp_path / "out")
    sample = DataConfig(dataset="shards", root=str(tmp_path / "out"), target_domain="rural_irrg",
                        target_train_split="train", target_eval_split="train", source_eval_split="train")  # fmt: skip
    data = build_datasets(sample)
    assert data.target_train[0]["name"] == "0@irrg" and len(data.source_eval) == 2  # LoveDA's *_irrg domains
    with pytest.raises(ConfigError, match=r"'data.target_eval_split' = 'val' .*no val tiles of domain 'rural'"):
        build_datasets(replace(sample, target_eval_split="val"))


def test_s3_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://generic.example:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9999")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    loc = Location.parse("s3://bucket/some/prefix/")
    assert (loc.uri, loc.path) == ("s3://bucket/some/prefix", "bucket/some/prefix")
    assert loc.s3 == {"endpoint_override": "127.0.0.1:9999", "scheme": "http", "region": "eu-west-1"}
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert Location.parse("s3://bucket").s3 == {"endpoint_override": "generic.example:9000", "scheme": "https",
                                                 "region": "eu-west-1"}  # fmt: skip
    with pytest.raises(ValueError, match="no credentials"):
        Location.parse("s3://key:secret@bucket/x")


def test_cli_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shards"
    argv = ["data", "pack", "--dataset", "synthetic", "--out", str(out), "--shard-rows", "5"]
    assert main([*argv, "data.synthetic_tiles=2", "data.synthetic_tile_size=16"]) == 0
    printed = capsys.readouterr().out
    assert "rural: train 2, val 2, test 2; urban: train 2, val 2, test 2 (3 shard(s)" in printed
    assert f"data.dataset=shards data.root={out}" in printed
    assert main([*argv, "model.backbone=resnet50"]) == 2 and "data.* keys only" in capsys.readouterr().err
    assert main(["data", "pack", "--dataset", "loveda", "--root", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "Zenodo" in capsys.readouterr().err and (out / MANIFEST_FILE).is_file()  # nothing written: still valid


# ------------------------------------------------------------------------------------ S3 (moto)
@pytest.mark.slow  # a real moto server (≈ 11 s here), as the project marks its server tests
def test_s3_round_trip_and_loader_workers(moto_s3: MotoServer, synth_shards: Path) -> None:
    import boto3

    logs: list[str] = []
    m = pack_dataset(SYNTH, "s3://lpcgma-shards/packs/synth/", shard_rows=4, log=logs.append)
    assert m.location.uri == "s3://lpcgma-shards/packs/synth" and not any("testing-" in line for line in logs)
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=moto_s3.url).list_objects_v2(Bucket="lpcgma-shards")["Contents"]
    ]
    assert sorted(keys) == sorted(f"packs/synth/{f.name}" for f in synth_shards.iterdir())
    assert read_manifest("s3://lpcgma-shards/packs/synth").counts == read_manifest(synth_shards).counts

    local = build_datasets(DataConfig(dataset="shards", root=str(synth_shards), rcs_enabled=True))
    remote = build_datasets(DataConfig(dataset="shards", root="s3://lpcgma-shards/packs/synth", rcs_enabled=True))
    for name in SETS:
        assert_same_samples(getattr(local, name), getattr(remote, name))
    transform = TrainTransform(24, (0.5, 1.5), True, True)
    serial = TrainStream(local.source_train, transform, batch_size=2, seed=3, rcs_temperature=0.01).batches()  # type: ignore[arg-type]
    workers = TrainStream(remote.source_train, transform, batch_size=2, seed=3, num_workers=2,  # type: ignore[arg-type]
                          rcs_temperature=0.01).batches()  # fmt: skip
    for _ in range(3):  # forked workers open their own S3 connections
        a, b = next(serial), next(workers)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


# ------------------------------------------------------------------------------------- trainer
TINY = tiny_overrides(
    "data.rcs_enabled=true",
    "data.eval_max_tiles=1",
    "train.progress=false",
    "tracking.enabled=false",
    "method.name=source_only",
    tiles=2, tile_size=48, crop=32, window=48,
)  # fmt: skip


def test_trainer_trains_from_shards_and_folders_with_the_same_samples(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"
    folders = load_config(config, [*TINY, f"train.out_dir={tmp_path / 'folders'}"])
    pack_dataset(folders.data, tmp_path / "shards")
    shards = load_config(config, [*TINY, f"train.out_dir={tmp_path / 'run'}", "data.dataset=shards",
                                  f"data.root={tmp_path / 'shards'}"])  # fmt: skip
    a, b = Trainer(folders), Trainer(shards)
    assert isinstance(b.data.source_train, ShardDataset) and b.class_names == a.class_names
    for name in SETS:
        assert_same_samples(getattr(a.data, name), getattr(b.data, name))
    (src_a, tgt_a), (src_b, tgt_b) = a.train_streams, b.train_streams
    assert src_a.sampler is not None and src_b.sampler is not None  # rare-class sampling of the source tiles
    assert np.array_equal(src_a.sampler.probs, src_b.sampler.probs)
    for sa, sb in ((src_a, src_b), (tgt_a, tgt_b)):
        for x, y in zip(_take(sa.batches(0), 4), _take(sb.batches(0), 4), strict=True):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    result = b.fit()
    assert result.step == 2 and 0.0 <= result.final_metrics["target_miou"] <= 1.0
    assert result.best_checkpoint is not None and (result.best_checkpoint / "state.pt").is_file()
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss/total"]) for r in logs if "loss/total" in r)


def _take(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def test_experiment_scripts_recognise_a_shards_root(tmp_path: Path) -> None:
    from lpcgma.data.shards import MANIFEST_FILE
    from lpcgma.distributed.search_cli import is_shards_root

    assert is_shards_root("s3://bucket/loveda-shards")
    assert not is_shards_root(str(tmp_path))  # a dataset folder: the folder loaders
    (tmp_path / MANIFEST_FILE).write_text("{}")
    assert is_shards_root(str(tmp_path))
