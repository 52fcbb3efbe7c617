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

`pack_dataset` writes them from the folder datasets (`LoveDA`, `ISPRSPatches`, `SyntheticAerial`);
`ShardDataset` returns the samples those datasets return. S3 credentials come from the usual AWS
environment or config files and are never logged; ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``)
overrides the endpoint (MinIO, moto).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpcgma.config import DataConfig
from lpcgma.data.build import family_classes
from lpcgma.data.classes import IGNORE_INDEX, ClassInfo
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import FOLDERS, ISPRSPatches
from lpcgma.data.loveda import LoveDA, PngPairs, apply_mask_lut
from lpcgma.data.sampling import tile_histogram
from lpcgma.data.synthetic import Domain, Split, SyntheticAerial

Family = Literal["loveda", "isprs", "synthetic"]
Sample = dict[str, torch.Tensor | str]

FORMAT = "lpcgma-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
FAMILIES: tuple[Family, ...] = ("loveda", "isprs", "synthetic")
SPLITS: tuple[Split, ...] = ("train", "val", "test")
_RURAL_URBAN: tuple[Domain, ...] = ("rural", "urban")  # the synthetic and LoveDA domains
_SHARD_NAME = re.compile(r"shard-\d{5}\.parquet")

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


# =================================================================================== locations
class LocationError(ValueError):
    """A shards location is neither a local folder nor ``s3://bucket[/prefix]``."""


@dataclass(frozen=True)
class Location:
    """A shards folder: ``uri`` (absolute local path or ``s3://bucket/prefix``), its path inside the
    filesystem, and the S3 options (None for a local folder). Plain data: pickles to loader workers,
    each of which connects on its own (`filesystem`)."""

    uri: str
    path: str
    s3: Mapping[str, str] | None = None

    @classmethod
    def parse(cls, uri: str | Path) -> Location:
        text = str(uri)
        if not text.startswith("s3://"):
            if "://" in text:
                raise LocationError(
                    f"shards location {text!r} is invalid: expected a local folder or s3://bucket/prefix"
                )
            local = str(Path(text).expanduser().resolve())
            return cls(local, local)
        parts = urlsplit(text)
        if not parts.netloc or "@" in parts.netloc or parts.query or parts.fragment:
            raise LocationError(
                f"shards location {text!r} is invalid: expected s3://bucket/prefix (no credentials, query or "
                "fragment in the URI; credentials come from the AWS environment)"
            )
        prefix = parts.path.strip("/")
        return cls(
            f"s3://{parts.netloc}/{prefix}".rstrip("/"),
            f"{parts.netloc}/{prefix}".rstrip("/"),
            _s3_options(parts.netloc),
        )

    def filesystem(self) -> pafs.FileSystem:
        """A new filesystem handle (create one per process: connections must not cross a fork)."""
        return pafs.LocalFileSystem() if self.s3 is None else pafs.S3FileSystem(**self.s3)

    def join(self, name: str) -> str:
        """The filesystem path of file `name` in this folder."""
        return f"{self.path}/{name}"

    def show(self, name: str) -> str:
        """``uri/name``, for messages."""
        return f"{self.uri}/{name}"


def _s3_options(bucket: str) -> dict[str, str]:
    """S3FileSystem options: endpoint from $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, region from the
    environment or (real AWS only) the bucket. Credentials are left to the AWS SDK."""
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options |= {"endpoint_override": ep.netloc, "scheme": ep.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None  # left to the SDK; a wrong region then fails on first access, naming the bucket
    if region:
        options["region"] = region
    return options


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

        def need(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise DataError(f"shards manifest '{where}': key '{key}' = {value!r} is invalid: expected {expected}")

        need(isinstance(data, dict), "<root>", type(data).__name__, "a JSON object")
        for key in ("format", "format_version", "dataset", "classes", "mask_lut", "counts", "labelled", "shards"):
            need(key in data, key, None, "present (is this a shards folder written by `lpcgma data pack`?)")
        need(data["format"] == FORMAT, "format", data["format"], repr(FORMAT))
        version = data["format_version"]
        need(version == FORMAT_VERSION, "format_version", version, f"{FORMAT_VERSION} (repack with this lpcgma)")
        family = data["dataset"]
        need(family in FAMILIES, "dataset", family, f"one of {list(FAMILIES)}")
        names = family_classes(family).names
        need(data["classes"] == list(names), "classes", data["classes"], f"the {family} classes {list(names)}")

        lut = data["mask_lut"]
        valid_ids = f"raw values 0..255 → class ids 0..{len(names) - 1} or {IGNORE_INDEX}"
        need(isinstance(lut, dict), "mask_lut", lut, valid_ids)
        for raw, c in lut.items():
            ok = raw.isdigit() and int(raw) < 256 and isinstance(c, int) and (0 <= c < len(names) or c == IGNORE_INDEX)
            need(ok, f"mask_lut.{raw}", c, valid_ids)
        table = [-1] * 256
        for raw, c in lut.items():
            table[int(raw)] = c

        counts, labelled = data["counts"], data["labelled"]
        need(isinstance(counts, dict) and bool(counts), "counts", counts, "domain → {split → tiles}")
        for domain, splits in counts.items():
            need(
                isinstance(splits, dict) and bool(splits) and set(splits) <= set(SPLITS),
                f"counts.{domain}",
                splits,
                f"split ({'|'.join(SPLITS)}) → tiles",
            )
            for split, n in splits.items():
                need(isinstance(n, int) and n > 0, f"counts.{domain}.{split}", n, "a tile count > 0")
                flag = labelled.get(domain, {}).get(split) if isinstance(labelled, dict) else None
                need(isinstance(flag, bool), f"labelled.{domain}.{split}", flag, "true or false")

        shards: list[ShardFile] = []
        totals: dict[tuple[str, str], int] = {}
        need(isinstance(data["shards"], list) and bool(data["shards"]), "shards", data["shards"], "a list of shards")
        for i, s in enumerate(data["shards"]):
            form = "{file: shard-NNNNN.parquet, rows, bytes, parts: [{domain, split, rows}]}"
            ok = isinstance(s, dict) and isinstance(s.get("file"), str) and bool(_SHARD_NAME.fullmatch(s["file"]))
            ok = ok and isinstance(s.get("rows"), int) and isinstance(s.get("bytes"), int)
            need(ok and isinstance(s.get("parts"), list), f"shards[{i}]", s, form)
            parts = []
            for j, p in enumerate(s["parts"]):
                ok = isinstance(p, dict) and isinstance(p.get("rows"), int) and p["rows"] > 0
                ok = ok and p.get("split") in counts.get(p.get("domain"), {})
                need(ok, f"shards[{i}].parts[{j}]", p, "{domain, split, rows > 0} of a domain and split in 'counts'")
                parts.append((p["domain"], p["split"], p["rows"]))
                totals[p["domain"], p["split"]] = totals.get((p["domain"], p["split"]), 0) + p["rows"]
            need(sum(n for *_, n in parts) == s["rows"], f"shards[{i}].rows", s["rows"], "the sum of its parts' rows")
            shards.append(ShardFile(s["file"], s["rows"], s["bytes"], tuple(parts)))
        for domain, splits in counts.items():
            for split, n in splits.items():
                found = totals.get((domain, split), 0)
                need(
                    found == n, f"counts.{domain}.{split}", n, f"the {found} rows the shards list for {domain}/{split}"
                )

        meta = data.get("meta", {})
        need(isinstance(meta, dict) and all(isinstance(v, dict) for v in meta.values()), "meta", meta, "domain → {...}")
        return cls(
            location=location,
            dataset=family,
            classes=tuple(names),
            mask_lut=tuple(table),
            counts=counts,
            labelled={d: {sp: labelled[d][sp] for sp in splits} for d, splits in counts.items()},
            shards=tuple(shards),
            meta=meta,
            source=str(data.get("source", "")),
            created=str(data.get("created", "")),
        )


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


# ======================================================================================= packing
@dataclass(frozen=True)
class _Part:
    domain: str
    split: str
    tiles: Dataset[Sample]
    meta: dict[str, Any]


def _source_parts(data: DataConfig) -> list[_Part]:
    """The domains and splits of the dataset `data` describes that exist on disk (all, for synthetic)."""
    if data.dataset == "synthetic":
        out = []
        for domain in _RURAL_URBAN:  # urban (the default target) in data.synthetic_target_sensor
            sensor = data.synthetic_target_sensor if domain == "urban" else "rgb"
            shift = data.synthetic_shift if domain == "urban" else 1.0
            palette = data.synthetic_target_palette if domain == "urban" else "own"
            meta = {
                "tiles": data.synthetic_tiles,
                "tile_size": data.synthetic_tile_size,
                "seed": data.synthetic_seed,
                "sensor": sensor,
                "shift": shift,
                "palette": palette,
            }
            for split in SPLITS:
                n, size, seed = data.synthetic_tiles, data.synthetic_tile_size, data.synthetic_seed
                ds = SyntheticAerial(domain, split, n, size, seed, sensor, shift, "rural", palette)
                out.append(_Part(domain, split, ds, meta))
        return out
    if not data.root:
        raise ValueError(f"data.root is empty: packing {data.dataset} needs the dataset folder (--root)")
    root = Path(data.root)
    parts: list[_Part] = []
    if data.dataset == "loveda":
        for domain in _RURAL_URBAN:
            for split in SPLITS:
                if (root / split.capitalize() / domain.capitalize()).is_dir():
                    parts.append(_Part(domain, split, LoveDA(root, split, domain), {}))
        return parts or [_Part("rural", "train", LoveDA(root, "train", "rural"), {})]  # raises: what to download
    if data.dataset != "isprs":
        raise ValueError(f"data.dataset={data.dataset!r} cannot be packed: expected one of {list(FAMILIES)}")
    for name, folder in FOLDERS.items():
        for split in ("train", "val"):
            if (root / folder / split).is_dir():
                isprs = ISPRSPatches(root, name, split)  # type: ignore[arg-type]
                parts.append(_Part(name, split, isprs, isprs.meta))
    return parts or [_Part("potsdam", "train", ISPRSPatches(root, "potsdam", "train"), {})]  # raises likewise


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rows(part: _Part, num_classes: int) -> Iterator[dict[str, Any]]:
    """Shard rows of one part. Every tile is read through its dataset (decoded and validated); PNG
    files are stored as they are on disk, generated tiles are encoded as PNG."""
    ds = part.tiles
    for i in range(len(ds)):  # type: ignore[arg-type]
        sample = ds[i]
        try:
            hist = tile_histogram(sample["mask"], num_classes)
        except ValueError as e:
            raise DataError(f"{part.domain}/{part.split} tile {sample['name']!r}: {e}") from e
        if isinstance(ds, PngPairs):
            path = ds.images[i]
            image = path.read_bytes()
            mask = (ds.masks_dir / path.name).read_bytes() if ds.masks_dir is not None else None
        else:
            image = _encode_png(sample["image"].numpy().transpose(1, 2, 0))  # type: ignore[union-attr]
            mask = _encode_png(sample["mask"].numpy().astype(np.uint8))  # type: ignore[union-attr]
        yield {
            "image": image,
            "mask": mask,
            "domain": part.domain,
            "split": part.split,
            "tile_id": str(sample["name"]),
            "class_hist": hist.tolist(),
        }


def _mask_lut(part: _Part, num_classes: int) -> tuple[int, ...]:
    """Raw mask value → class id of the stored masks: the folder dataset's LUT, identity for generated ones."""
    if isinstance(part.tiles, PngPairs):
        return tuple(int(v) for v in part.tiles.lut)
    return tuple(v if v < num_classes or v == IGNORE_INDEX else -1 for v in range(256))


class _ShardWriter:
    """Rows → shard-00000.parquet, shard-00001.parquet, ...: a new shard when the next row would pass
    `max_bytes` (image + mask bytes) or `max_rows` (0: no row cap); one row group per row."""

    def __init__(self, fs: pafs.FileSystem, location: Location, max_bytes: float, max_rows: int) -> None:
        self.fs, self.location, self.max_bytes, self.max_rows = fs, location, max_bytes, max_rows
        self.done: list[ShardFile] = []
        self._sink: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._rows, self._bytes = 0, 0
        self._parts: list[list[Any]] = []  # [domain, split, rows] runs of the open shard

    @property
    def _name(self) -> str:
        return f"shard-{len(self.done):05d}.parquet"

    def add(self, row: dict[str, Any]) -> tuple[str, int]:
        """Write one row; return (shard file, row number in it)."""
        size = len(row["image"]) + len(row["mask"] or b"")
        if self._writer is not None and (
            self._bytes + size > self.max_bytes or (self.max_rows and self._rows >= self.max_rows)
        ):
            self.finish()
        if self._writer is None:
            self._sink = self.fs.open_output_stream(self.location.join(self._name))
            self._writer = pq.ParquetWriter(  # no compression: PNG bytes do not compress further
                self._sink,
                SHARD_SCHEMA,
                compression="none",
                use_dictionary=["domain", "split"],
                write_statistics=["domain", "split", "tile_id"],
            )
            self._rows, self._bytes, self._parts = 0, 0, []
        self._writer.write_table(pa.Table.from_pylist([row], schema=SHARD_SCHEMA))
        if self._parts and self._parts[-1][:2] == [row["domain"], row["split"]]:
            self._parts[-1][2] += 1
        else:
            self._parts.append([row["domain"], row["split"], 1])
        self._rows, self._bytes = self._rows + 1, self._bytes + size
        return self._name, self._rows - 1

    def finish(self) -> None:
        """Close the open shard (if any) and record it."""
        if self._writer is None:
            return
        name = self._name
        self._writer.close()
        self._sink.close()
        self._writer = self._sink = None
        size = self.fs.get_file_info(self.location.join(name)).size or 0
        self.done.append(ShardFile(name, self._rows, int(size), tuple((d, s, n) for d, s, n in self._parts)))

    def abort(self) -> None:
        """Close what is open after an error (the partial shard stays; no manifest refers to it)."""
        for closable in (self._writer, self._sink):
            if closable is not None:
                with contextlib.suppress(Exception):  # already failing: the original error is what matters
                    closable.close()
        self._writer = self._sink = None


def pack_dataset(
    data: DataConfig,
    dest: str | Path,
    shard_mb: float = 256.0,
    shard_rows: int = 1024,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Pack every domain and split of the dataset `data` describes into Parquet shards at `dest`.

    `data.dataset` is loveda (``data.root`` in the official layout; the splits present are packed),
    isprs (``data.root`` of `prepare_isprs` patches) or synthetic (generated from the data.synthetic_*
    keys; the urban domain in ``data.synthetic_target_sensor`` at ``data.synthetic_shift`` from rural).
    `dest` is a local folder or ``s3://bucket/prefix``. A shard is closed before it would pass
    `shard_mb` MB of PNG bytes or `shard_rows` rows (0: no row cap). An older manifest at `dest` is
    removed first and the new one written last; shard files of an older pack that are no longer listed are deleted.
    """
    if data.dataset not in FAMILIES:
        raise ValueError(f"data.dataset={data.dataset!r} cannot be packed: expected one of {list(FAMILIES)}")
    if shard_mb <= 0 or shard_rows < 0:
        raise ValueError(f"shard_mb must be > 0 and shard_rows >= 0, got {shard_mb}, {shard_rows}")
    say = log or (lambda _: None)
    location = Location.parse(dest)
    parts = _source_parts(data)  # every source folder is found (or reported) before anything is written
    classes = family_classes(data.dataset)
    fs = location.filesystem()
    if location.s3 is None:
        fs.create_dir(location.path, recursive=True)
    _delete(fs, location.join(MANIFEST_FILE))  # from here on an older pack at `dest` is invalid
    writer = _ShardWriter(fs, location, shard_mb * 2**20, shard_rows)
    index: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    labelled: dict[str, dict[str, bool]] = {}
    try:
        for part in parts:
            n = 0
            for row in _rows(part, classes.num_classes):
                shard, at = writer.add(row)
                index.append(
                    {k: row[k] for k in ("domain", "split", "tile_id", "class_hist")} | {"shard": shard, "row": at}
                )
                n += 1
            counts.setdefault(part.domain, {})[part.split] = n
            labelled.setdefault(part.domain, {})[part.split] = (
                not isinstance(part.tiles, PngPairs) or part.tiles.masks_dir is not None
            )
            say(f"packed {part.domain}/{part.split}: {n} tiles")
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    listed = {s.file for s in writer.done}
    for info in fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True)):
        if _SHARD_NAME.fullmatch(info.base_name) and info.base_name not in listed:
            fs.delete_file(info.path)  # a shard of an older, larger pack
    with fs.open_output_stream(location.join(INDEX_FILE)) as sink:
        pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), sink)
    manifest = Manifest(
        location=location,
        dataset=data.dataset,
        classes=classes.names,
        mask_lut=_mask_lut(parts[0], classes.num_classes),
        counts=counts,
        labelled=labelled,
        shards=tuple(writer.done),
        meta={p.domain: p.meta for p in parts if p.meta},
        source=str(Path(data.root).resolve()) if data.root and data.dataset != "synthetic" else "",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_last(fs, location, json.dumps(manifest.to_json(), indent=2))
    say(f"wrote {len(writer.done)} shard(s) and {MANIFEST_FILE} to {location.uri}")
    return manifest


def _delete(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _write_last(fs: pafs.FileSystem, location: Location, text: str) -> None:
    """Write the manifest: via a temporary file and a rename locally; one PUT (atomic) on S3."""
    final = location.join(MANIFEST_FILE)
    if location.s3 is not None:
        with fs.open_output_stream(final) as f:
            f.write(text.encode())
        return
    tmp = location.join(f".{MANIFEST_FILE}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, final)


__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "Location",
    "LocationError",
    "Manifest",
    "ShardDataset",
    "ShardFile",
    "decode_png",
    "pack_dataset",
    "read_manifest",
]
