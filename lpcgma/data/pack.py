"""Packing a prepared dataset into Parquet shards (the format and its reader: `lpcgma.data.shards`).

`pack_dataset` reads every tile of the folder datasets (`LoveDA`, `ISPRSPatches`) or the generator
(`SyntheticAerial`) through its dataset, so a bad file fails the pack, and writes the shards, the index
and, last, the manifest to a local folder or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset

from lpcgma.config import DataConfig
from lpcgma.data.classes import IGNORE_INDEX, family_classes
from lpcgma.data.errors import DataError
from lpcgma.data.isprs import FOLDERS, ISPRSPatches
from lpcgma.data.loveda import LoveDA, PngPairs
from lpcgma.data.sampling import tile_histogram
from lpcgma.data.shards import (
    FAMILIES,
    INDEX_FILE,
    INDEX_SCHEMA,
    MANIFEST_FILE,
    SHARD_NAME,
    SHARD_SCHEMA,
    SPLITS,
    Manifest,
    Sample,
    ShardFile,
)
from lpcgma.data.synthetic import Domain, SyntheticAerial
from lpcgma.storage import Location

_RURAL_URBAN: tuple[Domain, ...] = ("rural", "urban")  # the synthetic and LoveDA domains


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
            layouts = data.synthetic_target_layouts if domain == "urban" else "shifted"
            textures = data.synthetic_target_textures if domain == "urban" else "own"
            meta = {
                "tiles": data.synthetic_tiles,
                "tile_size": data.synthetic_tile_size,
                "seed": data.synthetic_seed,
                "sensor": sensor,
                "shift": shift,
                "palette": palette,
                "layouts": layouts,
                "textures": textures,
            }
            for split in SPLITS:
                n, size, seed = data.synthetic_tiles, data.synthetic_tile_size, data.synthetic_seed
                ds = SyntheticAerial(
                    domain, split, n, size, seed, sensor, shift, "rural", palette, layouts, textures=textures
                )  # fmt: skip
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
        if SHARD_NAME.fullmatch(info.base_name) and info.base_name not in listed:
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


__all__ = ["pack_dataset"]
