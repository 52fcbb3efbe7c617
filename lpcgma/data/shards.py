"""Parquet shards of a prepared dataset: packed once, streamed by every worker from a folder or S3.

A shards location (a local folder or ``s3://bucket/prefix``) holds

- ``shard-00000.parquet``, ...: one row per tile with the columns image (the PNG bytes as on disk),
  mask (the raw mask PNG bytes as on disk; null for a split without labels), domain, split,
  tile_id and class_hist (list<int64>: labelled pixels per class); one row group per tile, so a
  random read fetches exactly one tile;
- ``index.parquet``: the small columns of every tile (domain, split, tile_id, class_hist, shard,
  row), what the rare-class sampler reads instead of the shards;
- ``manifest.json``: format version, dataset family, classes, the raw mask value → class id table,
  tile counts per domain and split, the shard files, per-domain metadata (ISPRS prepare arguments,
  synthetic generation settings). Written last: an interrupted pack leaves no manifest, and a
  location without one is refused.

This module holds the format, the manifest and `ShardDataset`, which returns the samples the folder
datasets (`LoveDA`, `ISPRSPatches`, `SyntheticAerial`) return; `lpcgma.data.pack` writes the shards
from them. S3 credentials come from the usual AWS environment or config files and are never logged;
``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``) overrides the endpoint (MinIO, moto).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from torch.utils.data import Dataset

from lpcgma.data.classes import IGNORE_INDEX, ClassInfo, family_classes
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.loveda import apply_mask_lut
from lpcgma.data.synthetic import Split
from lpcgma.storage import Location

Family = Literal["loveda", "isprs", "synthetic"]
Sample = dict[str, torch.Tensor | str]

FORMAT = "lpcgma-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
FAMILIES: tuple[Family, ...] = ("loveda", "isprs", "synthetic")
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SHARD_NAME = re.compile(r"shard-\d{5}\.parquet")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),  # null: the split has no labels
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("class_hist", pa.list_(pa.int64()), nullable=False),
    ]
)
INDEX_SCHEMA = pa.schema(
    [
        *(SHARD_SCHEMA.field(name) for name in ("domain", "split", "tile_id", "class_hist")),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)


# ==================================================================================== manifest
@dataclass(frozen=True)
class ShardFile:
    """One shard file: its rows in order are `parts` — (domain, split, number of tiles) runs."""

    file: str
    rows: int
    bytes: int
    parts: tuple[tuple[str, str, int], ...]


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about a shards location (validated when read)."""

    location: Location
    dataset: Family  # the dataset family the shards were packed from
    classes: tuple[str, ...]
    mask_lut: tuple[int, ...]  # raw mask PNG value → class id (255 ignore, -1 invalid), 256 entries
    counts: dict[str, dict[str, int]]  # domain → split → tiles
    labelled: dict[str, dict[str, bool]]  # domain → split → has masks
    shards: tuple[ShardFile, ...]
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # domain → packing metadata
    source: str = ""  # where the tiles were packed from
    created: str = ""  # UTC time of the pack

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def describe(self) -> str:
        """``rural: train 16, val 4; urban: ...`` for messages."""
        return "; ".join(
            f"{d}: " + ", ".join(f"{s} {n}" for s, n in splits.items()) for d, splits in self.counts.items()
        )

    def tile_rows(self, domain: str, split: str) -> list[tuple[str, int]]:
        """(shard file, row) of each tile of `domain`/`split`, in dataset order."""
        out: list[tuple[str, int]] = []
        for shard in self.shards:
            row = 0
            for d, s, n in shard.parts:
                if (d, s) == (domain, split):
                    out += [(shard.file, r) for r in range(row, row + n)]
                row += n
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "mask_lut": {str(raw): c for raw, c in enumerate(self.mask_lut) if c >= 0},
            "counts": self.counts,
            "labelled": self.labelled,
            "index": INDEX_FILE,
            "shards": [
                {"file": s.file, "rows": s.rows, "bytes": s.bytes,
                 "parts": [{"domain": d, "split": sp, "rows": n} for d, sp, n in s.parts]}
                for s in self.shards
            ],
            "meta": self.meta,
            "source": self.source,
            "created": self.created,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any, location: Location) -> Manifest:
        """Validate a parsed manifest; a DataError names the manifest, the key and the value."""
        where = location.show(MANIFEST_FILE)
        try:
            m = _ManifestJSON.model_validate(data)
        except ValidationError as e:
            raise _structure_error(where, data, e.errors()[0]) from None

        def need(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise _invalid(where, key, value, f"expected {expected}")

        names = family_classes(m.dataset).names
        need(m.classes == list(names), "classes", m.classes, f"the {m.dataset} classes {list(names)}")
        table = [-1] * 256
        for raw, c in m.mask_lut.items():
            ok = int(raw) < 256 and (0 <= c < len(names) or c == IGNORE_INDEX)
            need(ok, f"mask_lut.{raw}", c, f"raw values 0..255 → class ids 0..{len(names) - 1} or {IGNORE_INDEX}")
            table[int(raw)] = c
        for domain, splits in m.counts.items():
            for split in splits:
                flag = m.labelled.get(domain, {}).get(split)
                need(flag is not None, f"labelled.{domain}.{split}", flag, "true or false")
        totals: dict[tuple[str, str], int] = {}
        for i, s in enumerate(m.shards):
            for j, p in enumerate(s.parts):
                ok = p.split in m.counts.get(p.domain, {})
                need(ok, f"shards[{i}].parts[{j}]", p.model_dump(), f"{_PART_FORM} of a domain and split in 'counts'")
                totals[p.domain, p.split] = totals.get((p.domain, p.split), 0) + p.rows
            need(sum(p.rows for p in s.parts) == s.rows, f"shards[{i}].rows", s.rows, "the sum of its parts' rows")
        for domain, splits in m.counts.items():
            for split, n in splits.items():
                found = totals.get((domain, split), 0)
                expected = f"the {found} rows the shards list for {domain}/{split}"
                need(found == n, f"counts.{domain}.{split}", n, expected)
        return cls(
            location=location,
            dataset=m.dataset,
            classes=names,
            mask_lut=tuple(table),
            counts=m.counts,
            labelled={d: {sp: m.labelled[d][sp] for sp in splits} for d, splits in m.counts.items()},
            shards=tuple(
                ShardFile(s.file, s.rows, s.bytes, tuple((p.domain, p.split, p.rows) for p in s.parts))
                for s in m.shards
            ),
            meta=m.meta,
            source=str(m.source),
            created=str(m.created),
        )


# The structure of manifest.json (types, ranges, names), checked by pydantic; `Manifest.from_json`
# then checks what relates keys to each other (classes and class ids of the family, row totals).
_STRICT = ConfigDict(strict=True)  # no coercion: "3" is not a tile count
_Count = Annotated[int, Field(gt=0)]
_SplitKey = Annotated[str, Field(pattern=f"^({'|'.join(SPLITS)})$")]
_PART_FORM = "{domain, split, rows > 0}"
_SHARD_FORM = "{file: shard-NNNNN.parquet, rows, bytes, parts: [{domain, split, rows}]}"


class _PartJSON(BaseModel):
    model_config = _STRICT
    domain: str
    split: str
    rows: _Count


class _ShardJSON(BaseModel):
    model_config = _STRICT
    file: Annotated[str, Field(pattern=f"^{SHARD_NAME.pattern}$")]
    rows: int
    bytes: int
    parts: list[_PartJSON]


class _ManifestJSON(BaseModel):
    model_config = _STRICT
    format: Literal["lpcgma-shards"]  # FORMAT
    format_version: Literal[1]  # FORMAT_VERSION (hand-written: a Literal takes no constant)
    dataset: Family
    classes: list[str]
    mask_lut: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], int]
    counts: Annotated[dict[str, Annotated[dict[_SplitKey, _Count], Field(min_length=1)]], Field(min_length=1)]
    labelled: dict[str, dict[str, bool]]
    shards: Annotated[list[_ShardJSON], Field(min_length=1)]
    meta: dict[str, dict[str, Any]] = {}
    source: Any = ""
    created: Any = ""


# What a key should hold where pydantic's message would not say, by (top-level key, depth of the key).
_EXPECTED: dict[tuple[str, int], str] = {
    ("format_version", 1): f"{FORMAT_VERSION} (repack with this lpcgma)",
    ("dataset", 1): f"one of {list(FAMILIES)}",
    ("counts", 1): "domain → {split → tiles}",
    ("counts", 2): f"split ({'|'.join(SPLITS)}) → tiles",
    ("shards", 2): _SHARD_FORM,
    ("shards", 4): _PART_FORM,
}


def _invalid(where: str, key: str, value: Any, reason: str) -> DataError:
    return DataError(f"shards manifest '{where}': key '{key}' = {value!r} is invalid: {reason}")


def _structure_error(where: str, data: Any, error: ErrorDetails) -> DataError:
    """pydantic's error as a DataError: a bad dict key names its dict, an error inside a shard or a
    part names the shard or part; the value shown is the manifest's (None: missing)."""
    loc = list(error["loc"])
    if "[key]" in loc:
        loc = loc[: loc.index("[key]") - 1]
    while any(isinstance(part, int) for part in loc) and not isinstance(loc[-1], int):
        loc.pop()
    if not loc:
        return _invalid(where, "<root>", type(data).__name__, "expected a JSON object")
    value = data
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error["type"] == "missing" and len(loc) == 1:
        return _invalid(where, key, None, "expected present (is this a shards folder written by `lpcgma data pack`?)")
    expected = _EXPECTED.get((str(loc[0]), len(loc)))
    msg = error["msg"]  # "Input should be ..."
    return _invalid(where, key, value, f"expected {expected}" if expected else msg[:1].lower() + msg[1:])


def read_manifest(location: str | Path | Location) -> Manifest:
    """The validated manifest of a shards location; DatasetNotFoundError when there is none."""
    loc = location if isinstance(location, Location) else Location.parse(location)
    fs, path = loc.filesystem(), loc.join(MANIFEST_FILE)
    try:
        found = fs.get_file_info(path).type == pafs.FileType.File
        if found:
            with fs.open_input_stream(path) as f:
                text = bytes(f.read()).decode()
    except OSError as e:
        raise DatasetNotFoundError(f"cannot read the shards manifest '{loc.show(MANIFEST_FILE)}': {e}") from e
    if not found:
        raise DatasetNotFoundError(
            f"no shards manifest '{loc.show(MANIFEST_FILE)}': pack a dataset there first (lpcgma data pack "
            f"--dataset loveda|isprs|synthetic --root SRC --out {loc.uri}); an interrupted pack leaves no manifest"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"shards manifest '{loc.show(MANIFEST_FILE)}' is not valid JSON: {e}") from e
    return Manifest.from_json(data, loc)


# ================================================================================== the dataset
def decode_png(data: bytes, mode: Literal["RGB", "L"], where: str) -> np.ndarray:
    """PNG bytes → RGB uint8 [H, W, 3] or (mode L) the stored values [H, W]; DataError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("RGB") if mode == "RGB" else im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode the PNG of {where} (corrupt shard?): {e}") from e
    return arr


class ShardDataset(Dataset[Sample]):
    """One domain and split of a shards location, as raw samples: ``{"image": uint8 [3,H,W],
    "mask": int64 [H,W], "name": tile id}``, exactly what the folder dataset it was packed from returns.

    Masks map through the manifest's raw value → class table; class ids beyond `classes` (ISPRS
    clutter in the 5-class protocol) become 255; a split without labels gives all-255 masks, and so
    does ``masks=False`` (an unlabelled target: neither masks nor histograms are read). Files are
    opened lazily, once per process (each DataLoader worker opens its own).
    `tile_class_histograms` reads the index file only (rare-class sampling without decoding masks).
    """

    def __init__(
        self,
        shards: str | Path | Manifest,
        domain: str,
        split: str,
        classes: ClassInfo | None = None,
        masks: bool = True,
    ) -> None:
        self.manifest = shards if isinstance(shards, Manifest) else read_manifest(shards)
        m = self.manifest
        if split not in m.counts.get(domain, {}):
            raise ValueError(
                f"the shards at '{m.location.uri}' hold no {split} tiles of domain {domain!r}; they hold {m.describe()}"
            )
        full = family_classes(m.dataset)
        self.classes = classes or full
        if self.classes.names != full.names[: self.classes.num_classes]:
            raise ValueError(f"classes {self.classes.names} are not the {m.dataset} classes {full.names} (or a prefix)")
        self.domain, self.split, self.labelled = domain, split, masks and m.labelled[domain][split]
        self._rows = m.tile_rows(domain, split)
        self._lut = np.asarray(m.mask_lut, dtype=np.int16)
        self._index: pa.Table | None = None
        self._pid = -1
        self._fs: pafs.FileSystem | None = None
        self._files: dict[str, pq.ParquetFile] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getstate__(self) -> dict[str, Any]:  # open handles stay in the process that opened them
        return {**self.__dict__, "_pid": -1, "_fs": None, "_files": {}}

    def _filesystem(self) -> pafs.FileSystem:
        if self._pid != os.getpid():  # new process (a forked loader worker): new connections
            self._pid, self._fs, self._files = os.getpid(), self.manifest.location.filesystem(), {}
        assert self._fs is not None
        return self._fs

    def _shard(self, name: str) -> pq.ParquetFile:
        fs = self._filesystem()
        if name not in self._files:
            loc = self.manifest.location
            try:
                pf = pq.ParquetFile(fs.open_input_file(loc.join(name)))
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"cannot open shard '{loc.show(name)}': {e}") from e
            rows = next(s.rows for s in self.manifest.shards if s.file == name)
            if pf.metadata.num_row_groups != rows or pf.metadata.num_rows != rows:
                raise DataError(
                    f"shard '{loc.show(name)}' has {pf.metadata.num_rows} rows in {pf.metadata.num_row_groups} row "
                    f"groups: the manifest expects {rows} rows, one row group each (repack the dataset)"
                )
            self._files[name] = pf
        return self._files[name]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self._rows):
            raise IndexError(f"tile {index} out of range for {len(self._rows)} tiles")
        name, row = self._rows[index]
        where = f"'{self.manifest.location.show(name)}' row {row}"
        columns = ["image", "mask", "tile_id"] if self.labelled else ["image", "tile_id"]
        rec = self._shard(name).read_row_group(row, columns=columns).to_pylist()[0]
        image = decode_png(rec["image"], "RGB", f"{where} (image of tile {rec['tile_id']!r})")
        if rec.get("mask") is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
        else:
            raw = decode_png(rec["mask"], "L", f"{where} (mask of tile {rec['tile_id']!r})")
            if raw.shape != image.shape[:2]:
                raise DataError(f"{where}: mask shape {raw.shape} differs from the image's {image.shape[:2]}")
            mask = apply_mask_lut(raw, self._lut, f"{where} (tile {rec['tile_id']!r})")
            mask[(mask >= self.classes.num_classes) & (mask != IGNORE_INDEX)] = IGNORE_INDEX
        return {
            "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(mask),
            "name": rec["tile_id"],
        }

    def _index_rows(self) -> pa.Table:
        """This domain/split's rows of the index file (tile_id, class_hist), in dataset order."""
        if self._index is None:
            loc = self.manifest.location
            try:
                table = pq.read_table(
                    loc.join(INDEX_FILE),
                    filesystem=self._filesystem(),
                    columns=["domain", "split", "tile_id", "class_hist"],
                )
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"cannot read the shards index '{loc.show(INDEX_FILE)}': {e}") from e
            mine = pc.and_(pc.equal(table["domain"], self.domain), pc.equal(table["split"], self.split))
            self._index = table.filter(mine)
            if self._index.num_rows != len(self):
                raise DataError(
                    f"shards index '{loc.show(INDEX_FILE)}' lists {self._index.num_rows} {self.domain}/{self.split} "
                    f"tiles but the manifest {len(self)} (repack the dataset)"
                )
        return self._index

    def tile_ids(self) -> list[str]:
        """The tile ids (sample names) in dataset order, from the index file."""
        return [str(t) for t in self._index_rows()["tile_id"].to_pylist()]

    def tile_class_histograms(self) -> np.ndarray:
        """Labelled pixels per tile and class, int64 [N, C] for this dataset's C classes (from the index)."""
        if not self.labelled:  # all-ignore masks
            return np.zeros((len(self), self.classes.num_classes), dtype=np.int64)
        column = self._index_rows()["class_hist"].combine_chunks()
        c = len(self.manifest.classes)
        if len(column) and not pc.all(pc.equal(pc.list_value_length(column), c)).as_py():
            raise DataError(
                f"shards index '{self.manifest.location.show(INDEX_FILE)}' holds histograms not of {c} classes"
            )
        hist = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(column), c)
        return hist[:, : self.classes.num_classes]


__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "Manifest",
    "ShardDataset",
    "ShardFile",
    "decode_png",
    "read_manifest",
]
