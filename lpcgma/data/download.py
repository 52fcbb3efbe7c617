"""Getting the real datasets: `lpcgma data download loveda|isprs`.

LoveDA is fetched from Zenodo (or a mirror) with resumable HTTP downloads, checked against the
published MD5 checksums and extracted into the official layout; a split already extracted and
verified is skipped. ISPRS Potsdam/Vaihingen are only handed out through the ISPRS request form: the
command says which archives to request and where to put them, extracts them and checks that every
official tile is there, so that `lpcgma data prepare-isprs` can take over.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import FOLDERS, ISPRS_URL, TILES, IsprsDataset, _is_label_path, tile_file_names
from lpcgma.data.loveda import _DOMAIN_DIRS, _SPLIT_DIRS, LOVEDA_URL

LOVEDA_SPLITS = tuple(_SPLIT_DIRS.values())  # Train, Val, Test
LOVEDA_DOMAINS = tuple(_DOMAIN_DIRS.values())  # Rural, Urban
LOVEDA_BASE_URL = f"{LOVEDA_URL}/files"  # <base>/<Split>.zip
LOVEDA_URL_ENV = "LPCGMA_LOVEDA_URL"  # a mirror's base URL, when --base-url is not given
# the MD5 checksums published for Zenodo record 5706578 (as listed by torchgeo's LoveDA dataset)
LOVEDA_MD5 = {
    "Train": "de2b196043ed9b4af1690b3f9a7d558f",
    "Val": "84cae2577468ff0b5386758bb386d31d",
    "Test": "a489be0090465e01fb067795d24e6b47",
}
LOVEDA_LICENCE = (
    "LoveDA (Wang et al., NeurIPS 2021 Datasets and Benchmarks) is licensed CC BY-NC-SA 4.0: "
    "non-commercial use only, with attribution, derivatives under the same licence."
)
MARKER_DIR = ".lpcgma"  # ROOT/.lpcgma/<key>.ok: what was extracted and verified under ROOT
USER_AGENT = "lpcgma-data-download (python urllib)"


class DownloadError(RuntimeError):
    """A download could not be completed (HTTP error, connection lost too often); the message names the URL."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its published checksum (the file has been deleted)."""


@dataclass(frozen=True)
class FetchOptions:
    """How files are fetched over HTTP."""

    progress: bool = True  # a tqdm progress bar (shown only when stderr is a terminal)
    retries: int = 5  # further attempts after a dropped connection, each resuming where the last stopped
    retry_wait_s: float = 2.0  # pause before retry k: k * retry_wait_s
    timeout_s: float = 60.0  # socket timeout of each request
    chunk_bytes: int = 1 << 20


def md5sum(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str, source: str) -> None:
    """Raise ChecksumError (and delete `path`) unless the file's MD5 is `md5`."""
    actual = md5sum(path)
    if actual != md5.lower():
        path.unlink()
        raise ChecksumError(
            f"checksum mismatch for '{path}' (from {source}): MD5 {actual}, expected the published {md5}. "
            "The file was deleted; run the command again to download it afresh (if it fails again, the "
            "server or mirror serves a different file)."
        )


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def _fetch_once(url: str, part: Path, options: FetchOptions) -> str | None:
    """One request appending to `part` from its current size; None when the whole file has arrived,
    else why not.

    A server that ignores the Range header (200 instead of 206) makes the download start over.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=options.timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: `part` already holds the whole file
            return None
        if e.code == 429 or e.code >= 500:  # busy or failing for now: worth another attempt
            return f"HTTP {e.code} {e.reason}"
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    with response:
        length = response.headers.get("Content-Length")
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                part.unlink()  # a range we did not ask for: start over on the next attempt
                return f"the server answered bytes {response.headers.get('Content-Range')} to a request from {offset}"
            total = int(match.group(2)) if match.group(2) != "*" else None
            mode = "ab"
        else:
            if offset:
                print(f"{url}: the server ignored the resume request (no HTTP Range support); starting over")
            offset, mode = 0, "wb"
            total = int(length) if length is not None else None
        show = options.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=offset, desc=part.stem, disable=not show, unit="B", unit_scale=True)
        with part.open(mode) as f, bar:
            while chunk := response.read(options.chunk_bytes):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        return "the connection closed before the end of the file"
    return None


def fetch(url: str, dest: Path, md5: str, options: FetchOptions = FetchOptions()) -> Path:
    """Download `url` to `dest` through ``dest.part`` (resumed from its size, also across runs) and
    verify its MD5; a `dest` already there is only verified. A mismatch deletes the file and raises
    ChecksumError; a connection lost more than `options.retries` times raises DownloadError.
    """
    if dest.is_file():
        verify_md5(dest, md5, f"an earlier download of {url}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(options.retries + 1):
        try:
            if (reason := _fetch_once(url, part, options)) is None:
                break
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, refused, truncated
            reason = f"{type(e).__name__}: {e}"
        size = part.stat().st_size if part.is_file() else 0
        if attempt == options.retries:
            raise DownloadError(
                f"cannot download {url} after {attempt + 1} attempts ({reason}); {size} bytes are kept in "
                f"'{part}': run the command again to resume"
            )
        print(f"{url}: {reason} at {size} bytes; resuming (attempt {attempt + 2} of {options.retries + 1})")
        time.sleep(options.retry_wait_s * (attempt + 1))
    verify_md5(part, md5, url)
    part.replace(dest)
    return dest


def _is_safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and not (path.parts and ":" in path.parts[0])


def safe_extract(archive: Path, dest: Path, password: str | None = None) -> list[str]:
    """Extract a zip archive into `dest` and return its member names.

    Every member is checked first: an absolute path or a '..' component (a member that would land
    outside `dest`) refuses the whole archive with DataError before anything is written.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"'{archive}' is not a readable zip archive ({e}): delete it and download it again") from e
    with zf:
        names = zf.namelist()
        unsafe = [n for n in names if not _is_safe_member(n)]
        if unsafe:
            raise DataError(
                f"refusing to extract '{archive}': {len(unsafe)} member(s) would be written outside '{dest}' "
                f"(absolute path or '..'), e.g. '{unsafe[0]}'"
            )
        try:
            zf.extractall(dest, pwd=password.encode() if password else None)
        except RuntimeError as e:  # zipfile: encrypted member without (the right) password
            raise DataError(
                f"cannot extract '{archive}': {e}. Pass the password given with the download (--password), "
                f"or extract it yourself into '{dest}'"
            ) from e
        except (zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"'{archive}' is corrupt ({e}): delete it and download it again") from e
    return names


def _marker(root: Path, key: str) -> Path:
    return root / MARKER_DIR / f"{key}.ok"


def _marked(root: Path, key: str, stamp: str) -> bool:
    marker = _marker(root, key)
    return marker.is_file() and marker.read_text().strip() == stamp


def _mark(root: Path, key: str, stamp: str) -> None:
    marker = _marker(root, key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp + "\n")


# --------------------------------------------------------------------------------------------- LoveDA


def loveda_folders(root: Path, split: str) -> dict[str, tuple[Path, Path | None]]:
    """domain → (images folder, masks folder or None) of one split; the Test split has no public masks."""
    return {
        domain: (root / split / domain / "images_png", None if split == "Test" else root / split / domain / "masks_png")
        for domain in LOVEDA_DOMAINS
    }


def _loveda_layout_complete(root: Path, split: str) -> list[Path]:
    """The official folders of `split` that are missing under `root`."""
    return [d for pair in loveda_folders(root, split).values() for d in pair if d is not None and not d.is_dir()]


def loveda_base_url(base_url: str | None = None) -> str:
    """`base_url`, else $LPCGMA_LOVEDA_URL, else Zenodo record 5706578; without a trailing slash."""
    return (base_url or os.environ.get(LOVEDA_URL_ENV) or LOVEDA_BASE_URL).rstrip("/")


def download_loveda(
    root: str | Path,
    splits: Sequence[str] = LOVEDA_SPLITS,
    *,
    base_url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    keep_archives: bool = False,
    options: FetchOptions = FetchOptions(),
) -> dict[str, str]:
    """Download, verify and extract LoveDA splits into ``root/<Split>/<Domain>/...``; split → what was done.

    Each split is ``<base>/<Split>.zip`` (see `loveda_base_url`), checked against `checksums` (default:
    the published `LOVEDA_MD5`). A split whose marker ``root/.lpcgma/<Split>.ok`` holds its checksum
    and whose folders exist is skipped ("skipped"); otherwise it is fetched and extracted
    ("downloaded"). The archive is deleted after extraction unless `keep_archives`.
    """
    root = Path(root)
    checksums = LOVEDA_MD5 if checksums is None else checksums
    unknown = [s for s in splits if s not in LOVEDA_SPLITS or s not in checksums]
    if unknown:
        raise ValueError(f"LoveDA split(s) {unknown}: expected some of {list(LOVEDA_SPLITS)}")
    base = loveda_base_url(base_url)
    print(LOVEDA_LICENCE)
    done: dict[str, str] = {}
    for split in splits:
        md5 = checksums[split]
        if _marked(root, split, md5) and not _loveda_layout_complete(root, split):
            print(f"{split}: already extracted and verified ({_marker(root, split)}): skipped")
            done[split] = "skipped"
            continue
        archive, url = root / f"{split}.zip", f"{base}/{split}.zip"
        print(f"{split}: {url} -> {archive}")
        fetch(url, archive, md5, options)
        print(f"{split}: checksum verified; extracting into {root}")
        safe_extract(archive, root)
        missing = _loveda_layout_complete(root, split)
        if missing:
            raise DataError(
                f"'{archive}' (from {url}) does not hold the official LoveDA layout: '{missing[0]}' is missing "
                f"after extraction (expected {split}/{{Rural,Urban}}/images_png"
                + ("" if split == "Test" else " and masks_png")
                + ")"
            )
        _mark(root, split, md5)
        if not keep_archives:
            archive.unlink()
        done[split] = "downloaded"
    return done


# ---------------------------------------------------------------------------------------------- ISPRS


@dataclass(frozen=True)
class IsprsArchive:
    """An archive of the ISPRS distribution that `prepare_isprs` needs."""

    name: str
    holds: str
    modality: str | None = None  # needed only for this Potsdam image modality; None: always needed


ISPRS_ARCHIVES: dict[str, tuple[IsprsArchive, ...]] = {
    "potsdam": (
        IsprsArchive("3_Ortho_IRRG.zip", "IRRG image tiles (--modality irrg, the default)", "irrg"),
        IsprsArchive("2_Ortho_RGB.zip", "RGB image tiles (--modality rgb)", "rgb"),
        IsprsArchive("5_Labels_all_noBoundary.zip", "label tiles with eroded boundaries"),
    ),
    "vaihingen": (
        IsprsArchive("ISPRS_semantic_labeling_Vaihingen.zip", "IRRG image tiles (top/)"),
        IsprsArchive(
            "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip",
            "label tiles with eroded boundaries, all 33 areas",
        ),
    ),
}
# some ISPRS shares hand out one archive per dataset holding the archives above
ISPRS_BUNDLES = {"potsdam": "Potsdam.zip", "vaihingen": "Vaihingen.zip"}


@dataclass(frozen=True)
class IsprsSplitTiles:
    """The official tile files of one ISPRS dataset split found under a folder."""

    expected: int  # tiles in the split
    images: int  # tiles whose image file was found
    labels: int  # tiles whose (eroded) label file was found
    missing: tuple[str, ...]  # file names not found


def find_isprs_tiles(
    src: Path, dataset: IsprsDataset, modality: str = "irrg", erode: bool = True
) -> dict[str, IsprsSplitTiles]:
    """split → which official tile files of `dataset` are under `src` (searched recursively, like
    `prepare_isprs`: Vaihingen labels, named like the images, count only in a ground-truth folder)."""
    found: dict[str, list[Path]] = {}
    for p in src.rglob("*.tif"):
        found.setdefault(p.name, []).append(p)
    out = {}
    for split, tiles in TILES[dataset].items():
        images = labels = 0
        missing: list[str] = []
        for tile in tiles:
            image_name, label_name = tile_file_names(dataset, tile, modality, erode)
            if any(not _is_label_path(p, src) for p in found.get(image_name, [])):
                images += 1
            else:
                missing.append(image_name)
            if any(_is_label_path(p, src) or image_name != label_name for p in found.get(label_name, [])):
                labels += 1
            else:
                missing.append(label_name)
        out[split] = IsprsSplitTiles(len(tiles), images, labels, tuple(missing))
    return out


def isprs_instructions(root: Path, modality: str = "irrg") -> str:
    """What to request from ISPRS and where to put it under `root`."""
    width = max(len(a.name) for archives in ISPRS_ARCHIVES.values() for a in archives)
    lines = [
        "ISPRS Potsdam and Vaihingen cannot be downloaded automatically: request them with the data request",
        f"form at {ISPRS_URL} (the reply gives the download link and, for some",
        "shares, a zip password; the terms you accept there apply). Put these archives, or their extracted",
        "folders, here:",
    ]
    for dataset, archives in ISPRS_ARCHIVES.items():
        lines.append(f"  {root / FOLDERS[dataset]}/")
        for a in archives:
            note = "" if a.modality in (None, modality) else f" [not needed for --modality {modality}]"
            lines.append(f"    {a.name:<{width}}  {a.holds}{note}")
    tiles = {FOLDERS[d]: sum(map(len, splits.values())) for d, splits in TILES.items()}
    lines += [
        f"({' or '.join(ISPRS_BUNDLES.values())} holding these archives work too.) Then run this command again:",
        "it extracts them and checks that every official tile is there ("
        + ", ".join(f"{name} {n} tiles" for name, n in tiles.items())
        + ").",
    ]
    return "\n".join(lines)


def _extract_isprs_archives(root: Path, dataset: str, password: str | None) -> None:
    """Extract the known archives under ``root/<Dataset>`` (each into a folder named after it), repeating
    for archives that come out of a bundle; an archive already extracted (same size) is skipped."""
    folder = root / FOLDERS[dataset]
    names = {a.name for a in ISPRS_ARCHIVES[dataset]} | {ISPRS_BUNDLES[dataset]}
    seen: set[Path] = set()
    while todo := [p for p in sorted(folder.rglob("*.zip")) if p.name in names and p not in seen]:
        for archive in todo:
            seen.add(archive)
            key, stamp = f"isprs/{archive.relative_to(root).as_posix()}", str(archive.stat().st_size)
            if _marked(root, key, stamp):
                continue
            dest = archive.with_suffix("")
            print(f"extracting {archive} -> {dest}")
            safe_extract(archive, dest, password)
            _mark(root, key, stamp)


def download_isprs(
    root: str | Path,
    datasets: Sequence[IsprsDataset] = ("potsdam", "vaihingen"),
    modality: str = "irrg",
    password: str | None = None,
) -> dict[str, dict[str, IsprsSplitTiles] | None]:
    """Print what to request from ISPRS; extract and verify what is already under ``root/<Dataset>``.

    Returns dataset → its tiles per split, or None when nothing of it is under `root` yet. A dataset
    that is present but incomplete raises DatasetNotFoundError naming every missing tile file.
    """
    root = Path(root)
    unknown = [d for d in datasets if d not in FOLDERS]
    if unknown:
        raise ValueError(f"ISPRS dataset(s) {unknown}: expected some of {list(FOLDERS)}")
    if modality not in ("rgb", "irrg"):
        raise ValueError(f"modality={modality!r}: expected rgb or irrg")
    print(isprs_instructions(root, modality))
    status: dict[str, dict[str, IsprsSplitTiles] | None] = {}
    problems: list[str] = []
    for dataset in datasets:
        folder = root / FOLDERS[dataset]
        if not folder.is_dir() or not any(folder.iterdir()):
            print(f"{FOLDERS[dataset]}: nothing under '{folder}' yet")
            status[dataset] = None
            continue
        _extract_isprs_archives(root, dataset, password)
        tiles = find_isprs_tiles(folder, dataset, "irrg" if dataset == "vaihingen" else modality)
        status[dataset] = tiles
        missing = [(split, name) for split, t in tiles.items() for name in t.missing]
        if missing:
            problems.append(
                f"{FOLDERS[dataset]}: {len(missing)} tile file(s) missing under '{folder}':\n"
                + "\n".join(f"  {split}: {name}" for split, name in missing)
            )
        else:
            print(
                f"{FOLDERS[dataset]}: all {sum(t.expected for t in tiles.values())} tiles found. Next: lpcgma data "
                f"prepare-isprs --src {folder} --out data/isprs_prepared --dataset {dataset} --modality "
                f"{'irrg' if dataset == 'vaihingen' else modality}"
            )
    if problems:
        raise DatasetNotFoundError(
            "\n".join(problems) + "\nThe archives listed above hold them: add the missing ones and run again."
        )
    return status
