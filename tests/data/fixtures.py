"""Fake-data generators that reproduce the official LoveDA and ISPRS file layouts with small tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lpcgma.data.classes import ISPRS_CLASSES
from lpcgma.data.isprs import TILES, tile_file_names


def blocky_labels(rng: np.random.Generator, h: int, w: int, num_values: int, block: int = 8) -> np.ndarray:
    """A label map of `block`-pixel squares with values 0..num_values-1 (uint8 [h, w])."""
    coarse = rng.integers(0, num_values, (h // block + 1, w // block + 1), dtype=np.uint8)
    return np.kron(coarse, np.ones((block, block), dtype=np.uint8))[:h, :w]


def write_loveda_split(
    root: Path,
    split: str = "Train",
    domain: str = "Rural",
    ids: tuple[int, ...] = (0, 1, 2, 10),
    size: int = 32,
    seed: int = 0,
    masks: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Write ``root/<split>/<domain>/{images_png,masks_png}/<id>.png``; return id → (image, raw mask)."""
    rng = np.random.default_rng(seed)
    folder = root / split / domain
    (folder / "images_png").mkdir(parents=True, exist_ok=True)
    if masks:
        (folder / "masks_png").mkdir(parents=True, exist_ok=True)
    out = {}
    for i in ids:
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        raw = blocky_labels(rng, size, size, 8)  # 0 (no-data) .. 7
        Image.fromarray(image).save(folder / "images_png" / f"{i}.png")
        if masks:
            Image.fromarray(raw).save(folder / "masks_png" / f"{i}.png")
        out[i] = (image, raw)
    return out


def write_loveda_tree(
    root: Path, splits: tuple[str, ...] = ("Train", "Val", "Test"), ids: tuple[int, ...] = (0, 1), size: int = 16
) -> Path:
    """The official LoveDA layout under `root` with `ids` tiles per split and domain (Test without masks)."""
    for s, split in enumerate(splits):
        for d, domain in enumerate(("Rural", "Urban")):
            write_loveda_split(root, split, domain, ids, size, seed=2 * s + d, masks=split != "Test")
    return root


def eroded(classes: np.ndarray) -> np.ndarray:
    """True where a pixel has a 4-neighbour of another class (the boundary the noBoundary labels blank)."""
    edge = np.zeros(classes.shape, dtype=bool)
    diff_v, diff_h = classes[1:] != classes[:-1], classes[:, 1:] != classes[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge


def colour_label(classes: np.ndarray, boundary: np.ndarray | None = None) -> np.ndarray:
    """ISPRS colour label [h, w, 3] of class ids, black where `boundary`."""
    label = np.asarray(ISPRS_CLASSES.palette, dtype=np.uint8)[classes]
    if boundary is not None:
        label[boundary] = 0
    return label


def write_isprs_tiles(
    src: Path, dataset: str, size: tuple[int, int] = (64, 64), seed: int = 0, skip: tuple[str, ...] = ()
) -> dict[str, dict[str, np.ndarray]]:
    """Write every official tile of `dataset` (all splits) as small TIFFs in the official folders.

    Returns tile → {"classes", "irrg", "rgb"} (Vaihingen has no "rgb"). File names in `skip` are not written.
    """
    rng = np.random.default_rng(seed)
    if dataset == "potsdam":
        dirs = {"rgb": "2_Ortho_RGB", "irrg": "3_Ortho_IRRG", "label": "5_Labels_all",
                "eroded": "5_Labels_all_noBoundary"}  # fmt: skip
    else:
        dirs = {"irrg": "ISPRS_semantic_labeling_Vaihingen/top",
                "label": "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE",
                "eroded": "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"}  # fmt: skip
    for d in dirs.values():
        (src / d).mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, np.ndarray]] = {}
    h, w = size
    for tile in TILES[dataset]["train"] + TILES[dataset]["val"]:
        classes = blocky_labels(rng, h, w, 6)
        tile_data = {"classes": classes}
        files = {}
        for modality in ("rgb", "irrg") if dataset == "potsdam" else ("irrg",):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            tile_data[modality] = image
            files[dirs[modality] + "/" + tile_file_names(dataset, tile, modality, False)[0]] = image
        files[dirs["label"] + "/" + tile_file_names(dataset, tile, "irrg", False)[1]] = colour_label(classes)
        files[dirs["eroded"] + "/" + tile_file_names(dataset, tile, "irrg", True)[1]] = colour_label(
            classes, eroded(classes)
        )
        for rel, arr in files.items():
            if Path(rel).name not in skip:
                Image.fromarray(arr).save(src / rel)
        out[tile] = tile_data
    return out


# mmsegmentation's ISPRS converters turn a colour label into ids by exact colour: black (the eroded
# boundary) 0, then white, blue, cyan, green, yellow, red 1..6 (their table lists these in OpenCV's BGR
# order); a colour outside the table becomes 0 too. Written out here independently of lpcgma's palette.
MMSEG_LABEL_COLOURS = ((0, 0, 0), (255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))


def mmseg_label(colour: np.ndarray) -> np.ndarray:
    """The label ids [h, w] uint8 that mmseg's Potsdam/Vaihingen converter writes for an RGB colour label."""
    out = np.zeros(colour.shape[:2], dtype=np.uint8)
    for value, rgb in enumerate(MMSEG_LABEL_COLOURS):
        out[np.all(colour[..., :3] == np.asarray(rgb, dtype=np.uint8), axis=-1)] = value
    return out


def write_mmseg_isprs(
    out: Path,
    dataset: str,
    tiles: dict[str, tuple[str, ...]] | None = None,
    size: tuple[int, int] = (64, 64),
    clip: int = 32,
    stride: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Write mmseg's converter output for `tiles` (split → tile ids; default 2 of each official split):
    ``out/img_dir/<split>/<name>.png`` (RGB) and ``out/ann_dir/<split>/<name>.png`` (ids 0..6, mode L), cut
    like the converter (`clip` patches every `stride`, the last flush with the edge) from eroded colour labels.

    Returns split → mmseg patch name → (image [clip, clip, 3], expected lpcgma mask: class ids, 255 boundary).
    """
    rng = np.random.default_rng(seed)
    tiles = tiles or {split: TILES[dataset][split][:2] for split in ("train", "val")}
    h, w = size
    written: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for split, ids in tiles.items():
        (out / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (out / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        written[split] = {}
        for tile in ids:
            classes = blocky_labels(rng, h, w, 6)
            boundary = eroded(classes)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            label = mmseg_label(colour_label(classes, boundary))
            expected = np.where(boundary, 255, classes).astype(np.uint8)
            prefix = tile if dataset == "potsdam" else f"area{tile}"
            for y in sorted({min(v, h - clip) for v in range(0, h - clip + stride, stride)}):
                for x in sorted({min(v, w - clip) for v in range(0, w - clip + stride, stride)}):
                    name = f"{prefix}_{x}_{y}_{x + clip}_{y + clip}"
                    Image.fromarray(image[y : y + clip, x : x + clip]).save(out / "img_dir" / split / f"{name}.png")
                    Image.fromarray(label[y : y + clip, x : x + clip]).save(out / "ann_dir" / split / f"{name}.png")
                    written[split][name] = (image[y : y + clip, x : x + clip], expected[y : y + clip, x : x + clip])
    return written
