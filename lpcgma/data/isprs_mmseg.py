"""Import ISPRS Potsdam/Vaihingen patches prepared by mmsegmentation into lpcgma's prepared layout.

mmsegmentation's converters (``tools/dataset_converters/potsdam.py``, ``vaihingen.py``) write
``SRC/img_dir/{train,val}/*.png`` and ``SRC/ann_dir/{train,val}/*.png`` whose labels are 0 = ignore
(the eroded boundary, and any colour outside the palette) and 1..6 = impervious surfaces, building,
low vegetation, tree, car, clutter (mmseg's ``reduce_zero_label`` turns them into 0..5 with 255 when
training). Read as lpcgma masks they would be off by one class without a word, so
`import_mmseg_isprs` remaps them (0 → 255, k → k − 1), checks every pair first, and writes
``OUT/<Potsdam|Vaihingen>/<split>/{images,masks}/`` with its ``prepare.json`` manifest through the
same staging and install helpers as `prepare_isprs`: an import that fails or is interrupted leaves
no half-prepared folder (and a previous preparation as it was).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from lpcgma.data.classes import IGNORE_INDEX
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import FOLDERS, SPLITS, IsprsDataset, install_staged_splits, staging_folder
from lpcgma.data.loveda import read_png

MMSEG_BOUNDARY = 0  # mmseg's ISPRS label for the eroded boundary (ignored by reduce_zero_label)
MMSEG_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")  # labels 1..6
# mmseg label → lpcgma class id; -1: not an mmseg ISPRS label value. mmseg's class k (1..6) is
# lpcgma's class k - 1: both follow the official ISPRS order (ISPRS_CLASSES; a test compares them).
MMSEG_TO_LPCGMA = np.full(256, -1, dtype=np.int16)
MMSEG_TO_LPCGMA[MMSEG_BOUNDARY] = IGNORE_INDEX
MMSEG_TO_LPCGMA[1 : 1 + len(MMSEG_CLASSES)] = np.arange(len(MMSEG_CLASSES))

LAYOUT = "SRC/img_dir/{train,val}/*.png with SRC/ann_dir/{train,val}/*.png (mmsegmentation's converters)"
# mmseg patch names: Potsdam '<i>_<j>_<x0>_<y0>_<x1>_<y1>', Vaihingen 'area<n>_<x0>_<y0>_<x1>_<y1>'
_MMSEG_NAME = re.compile(r"^(?:area)?(?P<tile>\d+(?:_\d+)?)_(?P<x>\d+)_(?P<y>\d+)_\d+_\d+$")


@dataclass
class ImportReport:
    """What `import_mmseg_isprs` wrote: patches per split, and the entries it left out (non-PNG files,
    folders other than train/val), the boundary (→ ignore) fraction of the labels, the dataset folder."""

    patches: int
    skipped: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)
    ignore_fraction: float = 0.0
    root: Path = Path()

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.per_split.items())
        skipped = f"; skipped {len(self.skipped)} entr(ies), e.g. '{self.skipped[0]}'" if self.skipped else ""
        return (
            f"imported {self.patches} mmseg patches ({splits}) into '{self.root}'; labels remapped "
            f"(0 → ignore, 1..6 → classes 0..5), {self.ignore_fraction:.1%} of pixels ignore{skipped}"
        )


def mmseg_to_lpcgma_labels(label: np.ndarray, source: str | Path = "label") -> np.ndarray:
    """mmseg ISPRS label ids (0 = boundary, 1..6 = classes) → lpcgma class ids uint8 (0..5, 255 ignore).

    Any other value is a DataError naming it and `source`: it is not an mmseg ISPRS label.
    """
    label = np.asarray(label)
    if label.dtype.kind not in "ui":
        raise DataError(f"label '{source}' has dtype {label.dtype}: expected integer mmseg label ids 0..6")
    values = label.astype(np.int64)
    bad_mask = (values < 0) | (values > len(MMSEG_CLASSES))
    if bad_mask.any():
        bad = np.unique(values[bad_mask])[:10].tolist()
        hint = " (255: already remapped with reduce_zero_label, not the converters' output)" if 255 in bad else ""
        raise DataError(
            f"label '{source}' holds value(s) {bad}: mmseg ISPRS labels are 0 (boundary) and 1..6 "
            f"({', '.join(MMSEG_CLASSES)}){hint}"
        )
    return MMSEG_TO_LPCGMA[values].astype(np.uint8)


def lpcgma_patch_name(stem: str) -> str:
    """mmseg's '<tile>_<x0>_<y0>_<x1>_<y1>' ('area<n>_…' for Vaihingen) → prepare_isprs' '<tile>_<y>_<x>';
    any other name is kept."""
    m = _MMSEG_NAME.match(stem)
    return f"{m['tile']}_{m['y']}_{m['x']}" if m else stem


def find_mmseg_pairs(src: Path) -> tuple[dict[str, list[tuple[Path, Path]]], list[str]]:
    """split → sorted (image, label) pairs of mmseg's layout under `src`, and the entries left out.

    Reads no pixel: a missing layout, an image without a label (or the reverse), an empty split or
    no split at all raise naming the folder or file.
    """
    img_root, ann_root = src / "img_dir", src / "ann_dir"
    if not src.is_dir():
        raise DatasetNotFoundError(f"mmseg ISPRS folder '{src}' does not exist: expected {LAYOUT}")
    for d in (img_root, ann_root):
        if not d.is_dir():
            raise DatasetNotFoundError(f"'{d}' not found: expected {LAYOUT}")
    skipped = [str(p) for root in (img_root, ann_root) for p in sorted(root.iterdir()) if p.name not in SPLITS]
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for split in SPLITS:
        img_dir, ann_dir = img_root / split, ann_root / split
        if not img_dir.is_dir() and not ann_dir.is_dir():
            continue
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DatasetNotFoundError(f"'{d}' not found: {split} has images and labels in {LAYOUT}")
        images, labels = _pngs(img_dir, skipped), _pngs(ann_dir, skipped)
        for have, lack, where, what in ((images, labels, ann_dir, "image"), (labels, images, img_dir, "label")):
            orphans = sorted(set(have) - set(lack))
            if orphans:
                other = "label" if what == "image" else "image"
                raise DataError(
                    f"{len(orphans)} {what}(s) in '{have[orphans[0]].parent}' have no {other} in '{where}', "
                    f"e.g. '{where / orphans[0]}' is missing"
                )
        if not images:
            raise DataError(f"no PNG patches in '{img_dir}' (empty {split} split)")
        pairs[split] = [(images[n], labels[n]) for n in sorted(images)]
    if not pairs:
        raise DatasetNotFoundError(f"no train or val split under '{img_root}': expected {LAYOUT}")
    return pairs, skipped


def _pngs(folder: Path, skipped: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() == ".png":
            out[p.name] = p
        else:
            skipped.append(str(p))
    return out


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """A patch image as uint8 [H, W, 3], and whether the file is an RGB PNG that can be copied as is."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, fmt, arr = im.mode, im.format, np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read PNG '{path}' (corrupt or not a PNG): {e}") from e
    if mode not in ("RGB", "RGBA"):
        raise DataError(f"image '{path}' is a {mode} image: expected 3 bands (RGB or IRRG)")
    return arr[..., :3], mode == "RGB" and fmt == "PNG"


def _import_split(
    pairs: list[tuple[Path, Path]], images_dir: Path, masks_dir: Path, names: set[str]
) -> tuple[set[tuple[int, int]], int, int]:
    """Check, remap and write one split's pairs; return the patch sizes seen and (ignored, all) pixels."""
    sizes: set[tuple[int, int]] = set()
    ignored = total = 0
    for image_path, label_path in pairs:
        image, copyable = _read_image(image_path)
        raw = read_png(label_path, "L")
        if raw.shape != image.shape[:2]:
            raise DataError(
                f"label '{label_path}' is {raw.shape[1]}x{raw.shape[0]} but image '{image_path}' is "
                f"{image.shape[1]}x{image.shape[0]} (width x height)"
            )
        mask = mmseg_to_lpcgma_labels(raw, label_path)
        name = lpcgma_patch_name(image_path.stem)
        if name in names:
            raise DataError(f"patch '{image_path}' would be written as '{name}.png', which another patch is")
        names.add(name)
        if copyable:
            shutil.copyfile(image_path, images_dir / f"{name}.png")
        else:
            Image.fromarray(np.ascontiguousarray(image)).save(images_dir / f"{name}.png")
        Image.fromarray(mask).save(masks_dir / f"{name}.png")
        sizes.add((mask.shape[0], mask.shape[1]))
        ignored += int((mask == IGNORE_INDEX).sum())
        total += mask.size
    return sizes, ignored, total


def import_mmseg_isprs(
    src: str | Path,
    out: str | Path,
    dataset: IsprsDataset,
    modality: Literal["rgb", "irrg"] | None = None,
) -> ImportReport:
    """Import mmseg-prepared ISPRS patches from `src` into ``out/<Potsdam|Vaihingen>``; return the report.

    `modality` is what mmseg's images hold: Vaihingen's are IRRG (the default); for Potsdam it must be
    given (mmseg documents ``2_Ortho_RGB.zip``, but any Potsdam archive converts), since training
    refuses patches whose recorded modality differs from ``data.isprs_modality``. The pairs are listed
    and checked before anything is written; each is then decoded, checked (3-band image, label of the
    same size, values 0..6) and remapped into a staging folder, installed only when all succeeded.
    """
    if dataset not in FOLDERS:
        raise ValueError(f"dataset={dataset!r}: expected one of {sorted(FOLDERS)}")
    if dataset == "vaihingen":
        modality = modality or "irrg"
        if modality != "irrg":
            raise ValueError(f"modality={modality!r}: Vaihingen tiles are IRRG only")
    elif modality not in ("rgb", "irrg"):
        raise ValueError(
            f"modality={modality!r}: say which bands the mmseg Potsdam images hold, rgb (mmseg's documented "
            "2_Ortho_RGB.zip) or irrg"
        )
    src, root = Path(src), Path(out) / FOLDERS[dataset]
    pairs, skipped = find_mmseg_pairs(src)
    per_split: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    ignored = total = 0
    with staging_folder(root) as staging:
        for split, split_pairs in pairs.items():
            images_dir, masks_dir = staging / split / "images", staging / split / "masks"
            images_dir.mkdir(parents=True)
            masks_dir.mkdir(parents=True)
            split_sizes, split_ignored, split_total = _import_split(split_pairs, images_dir, masks_dir, set())
            sizes |= split_sizes
            ignored, total, per_split[split] = ignored + split_ignored, total + split_total, len(split_pairs)
        (h, w) = next(iter(sizes)) if len(sizes) == 1 else (0, -1)
        meta: dict[str, Any] = {  # patch_size: None unless all patches are one square size
            "dataset": dataset, "modality": modality, "patch_size": h if h == w else None,
            "stride": None, "ignore_clutter": False, "erode": ignored > 0, "source": "mmseg",
        }  # fmt: skip
        install_staged_splits(root, staging, meta)
    return ImportReport(sum(per_split.values()), skipped, per_split, ignored / max(total, 1), root)
