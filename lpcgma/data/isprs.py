"""ISPRS Potsdam and Vaihingen: cut the official tiles into labelled patches, and read those patches.

`prepare_isprs` finds the official tile files anywhere under a source folder, maps the colour labels
to the six classes (eroded boundaries and, optionally, clutter → 255) and writes
``out_dir/<Potsdam|Vaihingen>/<train|val>/{images,masks}/<tile>_<y>_<x>.png`` with the standard tile
splits, and ``prepare.json`` (the manifest) beside them. `ISPRSPatches` reads one dataset and split of
that layout and refuses a folder without a manifest. mmsegmentation-prepared patches are imported
into this layout by `lpcgma.data.isprs_mmseg`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from lpcgma.data.classes import IGNORE_INDEX, ISPRS_CLASSES, ISPRS_CLASSES_NO_CLUTTER
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.loveda import PngPairs

IsprsDataset = Literal["potsdam", "vaihingen"]
IsprsSplit = Literal["train", "val"]

ISPRS_URL = "https://www.isprs.org/education/benchmarks/UrbanSemLab/"
TILES: dict[str, dict[str, tuple[str, ...]]] = {
    "potsdam": {
        "train": (
            "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
            "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9",
        ),
        "val": (
            "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
            "6_15", "7_13",
        ),
    },
    "vaihingen": {
        "train": tuple(map(str, (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37))),
        "val": tuple(map(str, (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38))),
    },
}  # fmt: skip
FOLDERS = {"potsdam": "Potsdam", "vaihingen": "Vaihingen"}
META_FILE = "prepare.json"  # the manifest: the prepare_isprs arguments, written beside the split folders
SPLITS: tuple[IsprsSplit, ...] = ("train", "val")
STAGING_PREFIX = ".prepare-"

# Label colours are binarised per channel (> 127) into a 3-bit code 4r + 2g + b; black (the eroded
# boundary of the noBoundary labels) and magenta (unused) → ignore.
_CODE_TO_CLASS = np.full(8, IGNORE_INDEX, dtype=np.uint8)
for _c, (_r, _g, _b) in enumerate(ISPRS_CLASSES.palette):
    _CODE_TO_CLASS[4 * (_r > 127) + 2 * (_g > 127) + (_b > 127)] = _c
CLUTTER = ISPRS_CLASSES.names.index("clutter")
# a label tile whose pixels are this often far from pure 0/255 channel values is not a colour label
_MAX_MIXED_FRACTION = 0.05
_LABEL_FOLDER = re.compile(r"ground_truth|gts|^gt$|^labels?$", re.IGNORECASE)


def tile_file_names(dataset: IsprsDataset, tile: str, modality: str, erode: bool) -> tuple[str, str]:
    """The official (image, label) file names of one tile."""
    suffix = "_noBoundary" if erode else ""
    if dataset == "potsdam":
        return f"top_potsdam_{tile}_{modality.upper()}.tif", f"top_potsdam_{tile}_label{suffix}.tif"
    return f"top_mosaic_09cm_area{tile}.tif", f"top_mosaic_09cm_area{tile}{suffix}.tif"


def _is_label_path(path: Path, src_dir: Path) -> bool:
    return any(_LABEL_FOLDER.search(part) for part in path.relative_to(src_dir).parent.parts)


def _find_tile_files(
    src_dir: Path, dataset: IsprsDataset, modality: str, erode: bool
) -> dict[str, dict[str, tuple[Path, Path]]]:
    """split → tile → (image path, label path), searching `src_dir` recursively; missing → error."""
    found: dict[str, list[Path]] = {}
    for p in sorted(src_dir.rglob("*.tif")):
        found.setdefault(p.name, []).append(p)
    out: dict[str, dict[str, tuple[Path, Path]]] = {}
    missing: list[str] = []
    for split, tiles in TILES[dataset].items():
        out[split] = {}
        for tile in tiles:
            image_name, label_name = tile_file_names(dataset, tile, modality, erode)
            # Vaihingen images and full labels share a name: labels are those in a ground-truth folder
            images = [p for p in found.get(image_name, []) if not _is_label_path(p, src_dir)]
            labels = [p for p in found.get(label_name, []) if _is_label_path(p, src_dir) or image_name != label_name]
            if not images:
                missing.append(image_name)
            if not labels:
                missing.append(label_name)
            if images and labels:
                out[split][tile] = (images[0], labels[0])
    if missing:
        raise DatasetNotFoundError(
            f"ISPRS {FOLDERS[dataset]}: {len(missing)} tile file(s) not found under '{src_dir}' (searched "
            f"recursively), e.g. '{missing[0]}'"
            + (f" and '{missing[1]}'" if len(missing) > 1 else "")
            + f". Download the {FOLDERS[dataset]} benchmark from {ISPRS_URL}, extract the image "
            "and label archives under that folder (labels in a folder whose name contains "
            "'ground_truth' or 'gts' for Vaihingen), and run again."
        )
    return out


def read_tif(path: Path) -> np.ndarray:
    """An 8-bit TIFF as uint8 [H, W] or [H, W, C]; PIL first, `tifffile` when PIL cannot decode it."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB") if im.mode == "P" else im)
    except (OSError, ValueError, SyntaxError) as pil_error:
        try:
            import tifffile
        except ImportError as e:
            raise DataError(f"PIL cannot read '{path}' ({pil_error}); `pip install tifffile` to read it") from e
        try:
            arr = np.asarray(tifffile.imread(path))
        except Exception as e:
            raise DataError(f"cannot read TIFF '{path}' (corrupt or unsupported): {e}") from e
        if arr.size == 0:  # tifffile reads a damaged header as no pages at all
            raise DataError(f"cannot read TIFF '{path}' (corrupt or unsupported): no image data") from pil_error
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = arr.transpose(1, 2, 0)  # planar (C, H, W) → (H, W, C)
    if arr.dtype != np.uint8:
        raise DataError(f"TIFF '{path}' has dtype {arr.dtype}: expected 8-bit bands")
    return arr


def decode_isprs_label(label: np.ndarray, source: str | Path = "label") -> np.ndarray:
    """ISPRS colour label uint8 [H, W, 3] → class ids uint8 [H, W] (black boundary, unknown colours → 255)."""
    if label.ndim != 3 or label.shape[-1] < 3:
        raise DataError(f"label '{source}' has shape {label.shape}: expected an RGB colour label")
    rgb = label[..., :3]
    mixed = float(((rgb > 30) & (rgb < 225)).any(axis=-1).mean())
    if mixed > _MAX_MIXED_FRACTION:
        raise DataError(
            f"label '{source}': {mixed:.0%} of its pixels are not ISPRS label colours (is it an image tile?)"
        )
    bits = rgb > 127
    return _CODE_TO_CLASS[4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]]  # type: ignore[no-any-return]


def patch_origins(length: int, patch: int, stride: int) -> list[int]:
    """Patch start offsets along one axis: every `stride`, plus a last one flush with the far edge."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def prepare_isprs(
    src_dir: str | Path,
    out_dir: str | Path,
    dataset: IsprsDataset = "potsdam",
    modality: Literal["rgb", "irrg"] = "irrg",
    patch_size: int = 512,
    stride: int = 512,
    ignore_clutter: bool = False,
    erode: bool = True,
) -> dict[str, int]:
    """Cut the official tiles under `src_dir` into patches under `out_dir`; return patches per split.

    `erode` reads the ``*_noBoundary`` labels (boundary pixels → 255); `ignore_clutter` maps clutter
    to 255. Tiles smaller than a patch are padded (image 0, mask 255). Every tile file is located
    before anything is written; a missing one raises DatasetNotFoundError naming it. Patches are cut
    into a staging folder beside the splits and moved into place only once every tile was read, and
    ``prepare.json`` is written last: an unreadable tile (DataError naming it) leaves a previous
    preparation as it was.
    """
    if dataset not in TILES:
        raise ValueError(f"dataset={dataset!r}: expected one of {sorted(TILES)}")
    if modality not in ("rgb", "irrg"):
        raise ValueError(f"modality={modality!r}: expected rgb or irrg")
    if dataset == "vaihingen" and modality != "irrg":
        raise ValueError("Vaihingen tiles are IRRG only: use modality='irrg'")
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
    src_dir, root = Path(src_dir), Path(out_dir) / FOLDERS[dataset]
    if not src_dir.is_dir():
        raise DatasetNotFoundError(f"ISPRS source folder '{src_dir}' does not exist (download from {ISPRS_URL})")
    files = _find_tile_files(src_dir, dataset, modality, erode)
    counts: dict[str, int] = {}
    with staging_folder(root) as staging:
        for split, tiles in files.items():
            images_dir, masks_dir = staging / split / "images", staging / split / "masks"
            for d in (images_dir, masks_dir):
                d.mkdir(parents=True)
            counts[split] = 0
            for tile, (image_path, label_path) in tiles.items():
                image = read_tif(image_path)
                if image.ndim != 3 or image.shape[-1] < 3:
                    raise DataError(f"image '{image_path}' has shape {image.shape}: expected 3 bands")
                mask = decode_isprs_label(read_tif(label_path), label_path)
                if mask.shape != image.shape[:2]:
                    raise DataError(
                        f"label '{label_path}' is {mask.shape} but image '{image_path}' is {image.shape[:2]}"
                    )
                if ignore_clutter:
                    mask[mask == CLUTTER] = IGNORE_INDEX
                counts[split] += _write_patches(image[..., :3], mask, tile, images_dir, masks_dir, patch_size, stride)
        meta = {"dataset": dataset, "modality": modality, "patch_size": patch_size, "stride": stride,
                "ignore_clutter": ignore_clutter, "erode": erode}  # fmt: skip
        install_staged_splits(root, staging, meta)  # every tile was read
    return counts


@contextmanager
def staging_folder(root: Path) -> Iterator[Path]:
    """A fresh staging folder inside `root` (created if missing), removed on exit however it exits.

    Inside `root` so that `install_staged_splits`' renames stay on one filesystem (atomic); a `root`
    this call created is removed again if nothing was installed into it.
    """
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        yield staging
    finally:
        remove_staging(root, staging, created)


def remove_staging(root: Path, staging: Path, created: bool) -> None:
    """Delete `staging`, and `root` too when this preparation `created` it and it is left empty."""
    shutil.rmtree(staging, ignore_errors=True)
    if created and root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # a failed first preparation leaves no dataset folder behind


def install_staged_splits(root: Path, staging: Path, meta: dict[str, Any]) -> None:
    """Swap ``staging/<split>/{images,masks}`` into `root`, then write the manifest `meta` last.

    The manifest goes first, so a root caught half-way (a crash between renames) has none and is
    refused by `ISPRSPatches`. A split that `staging` lacks is removed from `root`: the manifest
    describes exactly the splits on disk. The old folders go into `staging` (deleted by the caller).
    """
    (root / META_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for kind in ("images", "masks"):
            target, new = root / split / kind, staging / split / kind
            if target.exists():
                target.rename(staging / f"old-{split}-{kind}")
            if new.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                new.rename(target)
        if (root / split).is_dir() and not any((root / split).iterdir()):
            (root / split).rmdir()
    write_manifest(root, meta)


def write_manifest(root: Path, meta: dict[str, Any]) -> None:
    """Write ``root/prepare.json`` (through a temporary file: never a half-written manifest)."""
    tmp = root / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(root / META_FILE)


def read_manifest(root: Path, dataset: IsprsDataset) -> dict[str, Any]:
    """The manifest of the prepared `dataset` folder `root`; a DataError when it is missing or foreign.

    Without it the folder was not written by `lpcgma data prepare-isprs` or `import-isprs` (or their
    run was interrupted): patches copied in from elsewhere, e.g. mmsegmentation's converters whose
    labels are 0 = boundary, 1..6 = classes, would be read as the wrong classes without a word.
    """
    meta_file = root / META_FILE
    fix = (
        f"prepare it from the official tiles (lpcgma data prepare-isprs --src DIR --out {root.parent} "
        f"--dataset {dataset}) or, for mmsegmentation-prepared patches (img_dir/ ann_dir/), import them "
        f"(lpcgma data import-isprs --from mmseg SRC --out {root.parent} --dataset {dataset})"
    )
    if not meta_file.is_file():
        raise DataError(
            f"ISPRS {FOLDERS[dataset]} folder '{root}' has no {META_FILE}: it was not written by lpcgma "
            f"(or its preparation was interrupted), so its labels cannot be trusted; {fix}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the manifest '{meta_file}' ({e}); {fix}") from e
    if not isinstance(meta, dict) or meta.get("dataset") != dataset:
        found = meta.get("dataset") if isinstance(meta, dict) else None
        raise DataError(
            f"ISPRS folder '{root}': its manifest '{meta_file}' names dataset {found!r}, not {dataset!r}; {fix}"
        )
    return meta


def _write_patches(
    image: np.ndarray, mask: np.ndarray, tile: str, images_dir: Path, masks_dir: Path, patch: int, stride: int
) -> int:
    h, w = mask.shape
    n = 0
    for y in patch_origins(h, patch, stride):
        for x in patch_origins(w, patch, stride):
            img = np.zeros((patch, patch, 3), dtype=np.uint8)
            msk = np.full((patch, patch), IGNORE_INDEX, dtype=np.uint8)
            crop = image[y : y + patch, x : x + patch]
            img[: crop.shape[0], : crop.shape[1]] = crop
            msk[: crop.shape[0], : crop.shape[1]] = mask[y : y + patch, x : x + patch]
            name = f"{tile}_{y}_{x}.png"
            Image.fromarray(img).save(images_dir / name)
            Image.fromarray(msk).save(masks_dir / name)
            n += 1
    return n


class ISPRSPatches(PngPairs):
    """Prepared patches ``root/<Potsdam|Vaihingen>/<split>/{images,masks}/<name>.png`` as raw samples.

    Mask values are 0..5 (impervious surfaces, building, low vegetation, tree, car, clutter) and 255;
    `ignore_clutter` maps clutter to 255 when reading (the 5-class protocol). `meta` is the folder's
    manifest (``prepare.json``: modality, patch size, ...); a folder without one, or whose manifest
    names another dataset, is refused (`read_manifest`): its label encoding is unknown.
    With ``masks=False`` (an unlabelled target) the masks are never read, nor need to exist: all 255.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: IsprsDataset = "potsdam",
        split: IsprsSplit = "train",
        ignore_clutter: bool = False,
        masks: bool = True,
    ) -> None:
        if dataset not in FOLDERS or split not in ("train", "val"):
            raise ValueError(
                f"ISPRSPatches dataset={dataset!r}, split={split!r}: expected potsdam|vaihingen, train|val"
            )
        self.root, self.dataset, self.split = Path(root), dataset, split
        folder = self.root / FOLDERS[dataset] / split
        masks_dir = folder / "masks" if masks else None
        for d in (folder / "images", masks_dir):
            if d is not None and not d.is_dir():
                mmseg = any((self.root / name).is_dir() for name in ("img_dir", "ann_dir"))
                raise DatasetNotFoundError(
                    f"ISPRS {FOLDERS[dataset]} {split} patches not found: expected the folder '{d}'. "
                    + (
                        f"'{self.root}' holds mmsegmentation's layout (img_dir/, ann_dir/): import it with "
                        f"lpcgma data import-isprs --from mmseg {self.root} --out DIR --dataset {dataset} "
                        "and set data.root=DIR."
                        if mmseg
                        else f"Download the benchmark from {ISPRS_URL} and run lpcgma.data.isprs.prepare_isprs("
                        f"src_dir, '{self.root}', dataset='{dataset}') (CLI: lpcgma data prepare-isprs) to "
                        "create it."
                    )
                )
        self.meta: dict[str, Any] = read_manifest(self.root / FOLDERS[dataset], dataset)
        lut = np.full(256, -1, dtype=np.int16)
        lut[: len(ISPRS_CLASSES.names)] = np.arange(len(ISPRS_CLASSES.names))
        lut[IGNORE_INDEX] = IGNORE_INDEX
        if ignore_clutter:
            lut[CLUTTER] = IGNORE_INDEX
        self.classes = ISPRS_CLASSES_NO_CLUTTER if ignore_clutter else ISPRS_CLASSES
        super().__init__(folder / "images", masks_dir, lut, f"ISPRS {FOLDERS[dataset]} {split}")
