"""Config → datasets: the source/target train and eval sets of one experiment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, Subset

from lpcgma.config import ConfigError, DataConfig
from lpcgma.data.classes import (
    ISPRS_CLASSES,
    ISPRS_CLASSES_NO_CLUTTER,
    LOVEDA_CLASSES,
    MEAN_STD,
    SYNTHETIC_CLASSES,
    ClassInfo,
)
from lpcgma.data.errors import DataError
from lpcgma.data.isprs import FOLDERS, ISPRSPatches
from lpcgma.data.loveda import LoveDA
from lpcgma.data.sensor import SensorShifted
from lpcgma.data.synthetic import SyntheticAerial

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
    """The datasets `data_cfg` describes; eval sets are cut to the first `eval_max_tiles` tiles."""
    c = data_cfg
    if c.dataset == "shards":
        raise NotImplementedError("Parquet shards: see issue 9")
    if c.dataset not in _DOMAINS:
        raise ConfigError(f"config key 'data.dataset' = {c.dataset!r} is invalid: expected one of {sorted(_DOMAINS)}")
    for key, value in (("source_domain", c.source_domain), ("target_domain", c.target_domain)):
        if value not in _DOMAINS[c.dataset]:
            raise ConfigError(
                f"config key 'data.{key}' = {value!r} is invalid for data.dataset={c.dataset}: "
                f"expected one of {list(_DOMAINS[c.dataset])}"
            )
    if c.dataset != "synthetic" and not c.root:
        raise ConfigError(f"config key 'data.root' is empty: data.dataset={c.dataset} needs the dataset folder")
    if c.dataset == "isprs" and c.target_eval_split == "test":
        raise ConfigError("config key 'data.target_eval_split' = 'test' is invalid for ISPRS: expected train or val")
    opened: dict[tuple[str, str, bool], RawDataset] = {}

    def get(domain: str, split: str, is_target: bool) -> RawDataset:  # one instance (and cache) per set
        if (domain, split, is_target) not in opened:
            opened[domain, split, is_target] = _open(c, domain, split, is_target)
        return opened[domain, split, is_target]

    if c.dataset == "isprs":
        classes = ISPRS_CLASSES_NO_CLUTTER if c.isprs_ignore_clutter else ISPRS_CLASSES
    else:
        classes = LOVEDA_CLASSES if c.dataset == "loveda" else SYNTHETIC_CLASSES
    mean, std = MEAN_STD[c.dataset]
    return DomainData(
        source_train=get(c.source_domain, "train", False),
        target_train=get(c.target_domain, c.target_train_split, True),
        target_eval=_first(get(c.target_domain, c.target_eval_split, True), c.eval_max_tiles),
        source_eval=_first(get(c.source_domain, c.source_eval_split, False), c.eval_max_tiles),
        classes=classes,
        mean=mean,
        std=std,
    )


def _first(dataset: RawDataset, n: int) -> RawDataset:
    """The first `n` tiles of `dataset` (all when n is 0 or at least its size)."""
    size = len(dataset)  # type: ignore[arg-type]
    return dataset if n <= 0 or n >= size else Subset(dataset, range(n))


def _open(c: DataConfig, domain: Any, split: Any, is_target: bool) -> RawDataset:
    """One raw dataset of the configured family (`domain` and `split` validated by the caller)."""
    if c.dataset == "synthetic":
        sensor = c.synthetic_target_sensor if is_target else "rgb"
        return SyntheticAerial(domain, split, c.synthetic_tiles, c.synthetic_tile_size, c.synthetic_seed, sensor)
    if c.dataset == "loveda":
        base, _, shift = str(domain).partition("_")
        tiles = LoveDA(c.root, split, base)  # type: ignore[arg-type]
        return SensorShifted(tiles) if shift == "irrg" else tiles
    ds = ISPRSPatches(c.root, domain, split, c.isprs_ignore_clutter)
    prepared = ds.meta.get("modality")
    if domain == "potsdam" and prepared is not None and prepared != c.isprs_modality:
        raise DataError(
            f"'{ds.root / FOLDERS[domain]}' holds {prepared} patches but data.isprs_modality="
            f"{c.isprs_modality}: prepare the {c.isprs_modality} patches (prepare_isprs(..., "
            f"modality='{c.isprs_modality}')) or change the config"
        )
    return ds
