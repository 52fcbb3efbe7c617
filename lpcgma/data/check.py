"""Check a dataset on disk against its official description: `lpcgma data check`.

LoveDA: image counts per split and domain, tile size, an image for every mask and a mask for every
image (Test has none), mask values (0 no-data .. 7, what `LoveDA` reads). ISPRS: every official tile
file of Potsdam/Vaihingen under the download folder. The report is a table plus one line per problem,
each naming its file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lpcgma.data.download import LOVEDA_DOMAINS, LOVEDA_SPLITS, find_isprs_tiles, loveda_folders
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import FOLDERS, IsprsDataset
from lpcgma.data.loveda import read_png, remap_loveda_mask

# images per split and domain in the official release (Wang et al., NeurIPS 2021)
LOVEDA_COUNTS = {
    ("Train", "Rural"): 1366,
    ("Train", "Urban"): 1156,
    ("Val", "Rural"): 992,
    ("Val", "Urban"): 677,
    ("Test", "Rural"): 976,
    ("Test", "Urban"): 820,
}
LOVEDA_TILE_SIZE = 1024


@dataclass
class GroupCheck:
    """What was found in one part of a dataset (a LoveDA split/domain, an ISPRS dataset split)."""

    group: str
    images: int = 0
    masks: int | None = 0  # None: this part has no masks (LoveDA Test)
    expected: int | None = None  # the official image count; None: not checked
    checked: int | None = 0  # images whose content was read; None: contents are not read
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """The result of checking a dataset: one `GroupCheck` per part."""

    dataset: str
    root: Path
    groups: list[GroupCheck]

    @property
    def problems(self) -> list[str]:
        return [f"{g.group}: {p}" for g in self.groups for p in g.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self, max_listed: int = 20) -> str:
        """A readable report: the table of groups, then the first `max_listed` problems."""
        headers = ("group", "images", "masks", "expected", "checked", "problems")
        rows = [
            (g.group, str(g.images), _dash(g.masks), _dash(g.expected), _dash(g.checked), str(len(g.problems)))
            for g in self.groups
        ]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        problems = self.problems
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        lines = [f"{self.dataset} under {self.root}: {verdict}", fmt.format(*headers)]
        lines += [fmt.format(*r) for r in rows]
        if problems:
            lines.append("problems:")
            lines += [f"  {p}" for p in problems[:max_listed]]
            if len(problems) > max_listed:
                lines.append(f"  ... and {len(problems) - max_listed} more")
        return "\n".join(lines)


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _spread(items: list[Path], sample: int | None) -> list[Path]:
    """All of `items`, or `sample` of them evenly spread over the list (first and last included)."""
    if sample is None or sample >= len(items):
        return items
    if sample <= 0:
        return []
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, sample).round().astype(int).tolist()))]


def _check_loveda_tile(image: Path, mask: Path | None, tile_size: int) -> list[str]:
    """Problems of one image (readable, tile_size²) and its mask (same size, values 0..7)."""
    try:
        with Image.open(image) as im:
            size = im.size
            im.verify()  # reads the whole file: a truncated or corrupt PNG fails here
    except (OSError, SyntaxError, ValueError) as e:
        return [f"'{image}': not a readable PNG ({e})"]
    problems = []
    if size != (tile_size, tile_size):
        problems.append(f"'{image}': {size[0]}x{size[1]} pixels, expected {tile_size}x{tile_size}")
    if mask is not None and mask.is_file():
        try:
            raw = read_png(mask, "L")
            remap_loveda_mask(raw, mask)
        except DataError as e:
            problems.append(str(e))
        else:
            if raw.shape != (size[1], size[0]):
                problems.append(f"'{mask}': {raw.shape[1]}x{raw.shape[0]} pixels but its image is {size[0]}x{size[1]}")
    return problems


def _check_loveda_group(
    root: Path, split: str, domain: str, expect_counts: bool, sample: int | None, tile_size: int
) -> GroupCheck:
    images_dir, masks_dir = loveda_folders(root, split)[domain]
    group = GroupCheck(
        f"{split}/{domain}",
        masks=None if masks_dir is None else 0,
        expected=LOVEDA_COUNTS[split, domain] if expect_counts else None,
    )
    hint = f"(lpcgma data download loveda --root {root} --splits {split})"
    if not images_dir.is_dir():
        group.problems.append(f"'{images_dir}': folder missing {hint}")
        return group
    images = sorted(images_dir.glob("*.png"))
    group.images = len(images)
    if group.expected is not None and group.images != group.expected:
        group.problems.append(f"'{images_dir}': {group.images} images, the official count is {group.expected}")
    if masks_dir is not None:
        if not masks_dir.is_dir():
            group.problems.append(f"'{masks_dir}': folder missing {hint}")
        else:
            masks = {p.name for p in masks_dir.glob("*.png")}
            group.masks = len(masks)
            names = {p.name for p in images}
            group.problems += [
                f"'{masks_dir / p.name}': missing (the mask of '{p}')" for p in images if p.name not in masks
            ]
            group.problems += [
                f"'{masks_dir / n}': a mask without an image in '{images_dir}'" for n in sorted(masks - names)
            ]
    checked = _spread(images, sample)
    group.checked = len(checked)
    for image in checked:
        group.problems += _check_loveda_tile(image, masks_dir / image.name if masks_dir else None, tile_size)
    return group


def check_loveda(
    root: str | Path,
    splits: Sequence[str] = LOVEDA_SPLITS,
    domains: Sequence[str] = LOVEDA_DOMAINS,
    *,
    expect_counts: bool = True,
    sample: int | None = None,
    tile_size: int = LOVEDA_TILE_SIZE,
) -> CheckReport:
    """Check LoveDA under `root` (official layout) for `splits` × `domains`.

    Counts are compared with `LOVEDA_COUNTS` unless `expect_counts` is off (a subset on disk); the
    size and mask values of every image (or `sample` images per group, evenly spread) are read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"LoveDA root '{root}' does not exist (lpcgma data download loveda --root {root})")
    if (sample is not None and sample < 0) or tile_size < 1:
        raise ValueError(f"sample={sample}, tile_size={tile_size}: expected sample >= 0 and tile_size >= 1")
    bad = [s for s in splits if s not in LOVEDA_SPLITS] + [d for d in domains if d not in LOVEDA_DOMAINS]
    if bad:
        raise ValueError(
            f"LoveDA {bad}: expected splits among {list(LOVEDA_SPLITS)}, domains among {list(LOVEDA_DOMAINS)}"
        )
    groups = [
        _check_loveda_group(root, split, domain, expect_counts, sample, tile_size)
        for split in splits
        for domain in domains
    ]
    return CheckReport("LoveDA", root, groups)


def check_isprs(
    root: str | Path, datasets: Sequence[IsprsDataset] = ("potsdam", "vaihingen"), modality: str = "irrg"
) -> CheckReport:
    """Check that every official tile file (image and eroded label) is under ``root/<Potsdam|Vaihingen>``,
    the folders `lpcgma data download isprs` sets up; contents are not read."""
    root = Path(root)
    groups = []
    for dataset in datasets:
        folder = root / FOLDERS[dataset]
        if not folder.is_dir():
            groups.append(
                GroupCheck(
                    FOLDERS[dataset],
                    checked=None,
                    problems=[f"'{folder}': folder missing (lpcgma data download isprs --root {root})"],
                )
            )
            continue
        tiles = find_isprs_tiles(folder, dataset, "irrg" if dataset == "vaihingen" else modality)
        for split, t in tiles.items():
            group = GroupCheck(f"{FOLDERS[dataset]}/{split}", t.images, t.labels, t.expected, None)
            group.problems = [f"'{name}': not found under '{folder}'" for name in t.missing]
            groups.append(group)
    return CheckReport("ISPRS", root, groups)
