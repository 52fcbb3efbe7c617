"""Config → datasets: the source/target train and eval sets of one experiment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.data import Dataset, Subset

from lpcgma.config import ConfigError, DataConfig
from lpcgma.data.classes import MEAN_STD, ClassInfo, family_classes
from lpcgma.data.errors import DataError
from lpcgma.data.isprs import FOLDERS, ISPRSPatches
from lpcgma.data.loveda import LoveDA
from lpcgma.data.sensor import SensorShifted
from lpcgma.data.synthetic import SyntheticAerial

if TYPE_CHECKING:
    from lpcgma.data.shards import Manifest

RawDataset = Dataset[dict[str, Any]]
# LoveDA's *_irrg domains: the domain's RGB tiles through the explicit IRRG sensor model (sensor.py),
# a cross-sensor task built from real tiles alone.
_DOMAINS = {
    "synthetic": ("rural", "urban"),
    "loveda": ("rural", "urban", "rural_irrg", "urban_irrg"),
    "isprs": tuple(FOLDERS),
}


@dataclass(frozen=True)
class DomainData:
    """The raw datasets of one source → target experiment, with their classes and normalisation."""

    source_train: RawDataset  # labelled source tiles
    target_train: RawDataset  # target tiles used for adaptation (their masks are read only by `oracle`)
    target_eval: RawDataset  # target tiles the metrics are computed on
    source_eval: RawDataset  # source validation tiles
    classes: ClassInfo
    mean: tuple[float, float, float]  # 0-255 pixel units
    std: tuple[float, float, float]


def build_datasets(data_cfg: DataConfig) -> DomainData:
    """The datasets `data_cfg` describes; eval sets are cut to the first `eval_max_tiles` tiles.

    ``data.dataset=shards`` reads Parquet shards (`lpcgma.data.shards`) from the folder or s3:// URI
    ``data.root``: the dataset family, domains and splits come from their manifest.
    """
    c = data_cfg
    if c.dataset not in _DOMAINS and c.dataset != "shards":
        expected = sorted([*_DOMAINS, "shards"])
        raise ConfigError(f"config key 'data.dataset' = {c.dataset!r} is invalid: expected one of {expected}")
    if c.dataset != "synthetic" and not c.root:
        what = "the shards folder or s3:// URI" if c.dataset == "shards" else "the dataset folder"
        raise ConfigError(f"config key 'data.root' is empty: data.dataset={c.dataset} needs {what}")
    if c.dataset in ("loveda", "isprs") and "://" in c.root:
        raise ConfigError(
            f"config key 'data.root' = {c.root!r} is invalid for data.dataset={c.dataset}: expected a local "
            "folder; to read from a URI, pack the dataset (lpcgma data pack) and set data.dataset=shards"
        )
    manifest = _read_manifest(c.root) if c.dataset == "shards" else None
    family = manifest.dataset if manifest is not None else c.dataset
    if manifest is None:
        domains = _DOMAINS[family]
    else:  # LoveDA's *_irrg domains apply to LoveDA shards too
        irrg = tuple(f"{d}_irrg" for d in manifest.domains) if family == "loveda" else ()
        domains = (*manifest.domains, *irrg)
    where = f" (the domains of the shards at '{c.root}')" if manifest is not None else ""
    for key, value in (("source_domain", c.source_domain), ("target_domain", c.target_domain)):
        if value not in domains:
            raise ConfigError(
                f"config key 'data.{key}' = {value!r} is invalid for data.dataset={c.dataset}: "
                f"expected one of {list(domains)}{where}"
            )
    if family == "isprs" and c.target_eval_split == "test":
        raise ConfigError("config key 'data.target_eval_split' = 'test' is invalid for ISPRS: expected train or val")
    if manifest is not None:
        _check_shard_splits(c, manifest)
    classes = family_classes(family, c.isprs_ignore_clutter)
    opened: dict[tuple[str, str, bool], RawDataset] = {}

    def get(domain: str, split: str, is_target: bool) -> RawDataset:  # one instance (and cache) per set
        if (domain, split, is_target) not in opened:
            tiles = _open(c, domain, split, is_target, manifest, classes)
            opened[domain, split, is_target] = CachedTiles(tiles) if c.cache_tiles else tiles
        return opened[domain, split, is_target]

    mean, std = MEAN_STD[family]
    return DomainData(
        source_train=get(c.source_domain, "train", False),
        target_train=get(c.target_domain, c.target_train_split, True),
        target_eval=_first(get(c.target_domain, c.target_eval_split, True), c.eval_max_tiles),
        source_eval=_first(get(c.source_domain, c.source_eval_split, False), c.eval_max_tiles),
        classes=classes,
        mean=mean,
        std=std,
    )


def _read_manifest(root: str) -> Manifest:
    from lpcgma.data.shards import read_manifest  # pyarrow only when shards are used
    from lpcgma.storage import LocationError

    try:
        return read_manifest(root)
    except LocationError as e:
        raise ConfigError(f"config key 'data.root' = {root!r} is invalid: {e}") from e


def _check_shard_splits(c: DataConfig, manifest: Manifest) -> None:
    """Every split the config reads is in the shards; the error names the config key."""
    for key, domain, split in (
        ("data.source_domain", c.source_domain, "train"),
        ("data.target_train_split", c.target_domain, c.target_train_split),
        ("data.target_eval_split", c.target_domain, c.target_eval_split),
        ("data.source_eval_split", c.source_domain, c.source_eval_split),
    ):
        base = domain.removesuffix("_irrg")
        if split not in manifest.counts[base]:
            value = domain if key == "data.source_domain" else split
            raise ConfigError(
                f"config key '{key}' = {value!r} is invalid: the shards at '{c.root}' hold no {split} tiles of "
                f"domain {base!r} (they hold {manifest.describe()})"
            )


class CachedTiles(Dataset[dict[str, Any]]):
    """Decoded tiles kept in memory after their first read (``data.cache_tiles``).

    For small datasets read many times (the 16-tile LoveDA sample, a few ISPRS patches): PNG decoding
    and the sensor model then run once per tile, not once per crop. Each loader process holds its
    own copy; every read returns fresh tensors, so transforms cannot alter the cache. Other
    attributes are the wrapped dataset's.
    """

    def __init__(self, tiles: RawDataset) -> None:
        self.tiles = tiles
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.tiles)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            self._cache[index] = self.tiles[index]
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in self._cache[index].items()}

    def __getattr__(self, name: str) -> Any:
        if name in ("tiles", "_cache"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.tiles, name)


def _first(dataset: RawDataset, n: int) -> RawDataset:
    """The first `n` tiles of `dataset` (all when n is 0 or at least its size)."""
    size = len(dataset)  # type: ignore[arg-type]
    return dataset if n <= 0 or n >= size else Subset(dataset, range(n))


def _open(
    c: DataConfig, domain: Any, split: Any, is_target: bool, manifest: Manifest | None, classes: ClassInfo
) -> RawDataset:
    """One raw dataset of the configured family or shards (`domain` and `split` validated by the caller).

    With ``data.target_labels=false`` LoveDA, ISPRS and shard target sets never read masks (synthetic
    tiles carry theirs; the trainer then uses no target mask).
    """
    masks = c.target_labels or not is_target
    if c.dataset == "synthetic":
        n, size, seed = c.synthetic_tiles, c.synthetic_tile_size, c.synthetic_seed
        if not is_target:
            return SyntheticAerial(domain, split, n, size, seed, "rgb")
        source: Any = c.source_domain  # validated by the caller
        sensor, strength, palette = c.synthetic_target_sensor, c.synthetic_shift, c.synthetic_target_palette
        layouts, textures = c.synthetic_target_layouts, c.synthetic_target_textures
        return SyntheticAerial(
            domain, split, n, size, seed, sensor, strength, source, palette, layouts, textures=textures
        )  # fmt: skip
    base, _, shift = str(domain).partition("_")  # LoveDA's *_irrg domains (validated by the caller)
    tiles: RawDataset
    meta: dict[str, Any] = {}  # ISPRS: the prepare_isprs arguments
    where = fix = ""
    if manifest is not None:
        from lpcgma.data.shards import ShardDataset

        tiles = ShardDataset(manifest, base, split, classes, masks=masks)
        meta, where, fix = manifest.meta.get(base, {}), f"'{manifest.location.uri}'", " and pack them"
    elif c.dataset == "loveda":
        tiles = LoveDA(c.root, split, base, masks=masks)  # type: ignore[arg-type]
    else:
        tiles = ISPRSPatches(c.root, domain, split, c.isprs_ignore_clutter, masks=masks)
        meta, where = tiles.meta, f"'{tiles.root / FOLDERS[domain]}'"
    prepared = meta.get("modality")
    if domain == "potsdam" and prepared is not None and prepared != c.isprs_modality:
        raise DataError(
            f"{where} holds {prepared} patches but data.isprs_modality={c.isprs_modality}: prepare the "
            f"{c.isprs_modality} patches (prepare_isprs(..., modality='{c.isprs_modality}')){fix} or change the config"
        )
    return SensorShifted(tiles) if shift == "irrg" else tiles
