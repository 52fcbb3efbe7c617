"""`lpcgma data download`: LoveDA from a real HTTP server on 127.0.0.1 (Range, dropped connections,
checksums, extraction, markers), and the ISPRS archive set-up."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lpcgma.cli import main
from lpcgma.data import download as dl
from lpcgma.data.download import (
    LOVEDA_URL_ENV,
    ChecksumError,
    DownloadError,
    FetchOptions,
    download_isprs,
    download_loveda,
    loveda_base_url,
    safe_extract,
)
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import prepare_isprs
from lpcgma.data.loveda import LoveDA

from .fixtures import write_isprs_tiles, write_loveda_tree

FAST = FetchOptions(progress=False, retries=2, retry_wait_s=0.0, timeout_s=5.0)


@dataclass
class ServerState:
    """What the test server serves and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)  # URL path → body
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    drops: dict[str, int] = field(default_factory=dict)  # path → how many next responses stop halfway
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        state = self.server.state
        path, range_header = self.path.split("?")[0], self.headers.get("Range")
        state.requests.append((path, range_header))
        body = state.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if range_header and not state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.drops.get(path, 0) > 0:  # an interrupted transfer: half the bytes, then the connection closes
            state.drops[path] -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    state: ServerState


@dataclass
class Server:
    url: str
    state: ServerState


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_folder(folder: Path) -> bytes:
    """A zip of `folder`'s files, named relative to `folder`."""
    return zip_bytes(
        {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    )


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    """Split → (zip in the official structure: <Split>/<Domain>/{images_png,masks_png}/<id>.png, its MD5)."""
    tree = write_loveda_tree(tmp_path_factory.mktemp("loveda_tree"))
    out = {}
    for split in ("Train", "Val", "Test"):
        members = {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted((tree / split).rglob("*.png"))}
        data = zip_bytes(members)
        out[split] = (data, hashlib.md5(data).hexdigest())
    return out


def serve(server: Server, archives: dict[str, tuple[bytes, str]], prefix: str = "") -> dict[str, str]:
    """Serve every archive under `prefix`; return the checksum table for them."""
    for split, (data, _) in archives.items():
        server.state.files[f"{prefix}/{split}.zip"] = data
    return {split: md5 for split, (_, md5) in archives.items()}


def test_download_extracts_the_official_layout(server, archives, tmp_path, capsys):
    md5 = serve(server, archives)
    done = download_loveda(tmp_path, base_url=server.url, checksums=md5, options=FAST)
    assert done == {"Train": "downloaded", "Val": "downloaded", "Test": "downloaded"}
    assert "CC BY-NC-SA 4.0" in capsys.readouterr().out
    for split in ("Train", "Val", "Test"):
        for domain in ("Rural", "Urban"):
            folder = tmp_path / split / domain
            assert sorted(p.name for p in (folder / "images_png").iterdir()) == ["0.png", "1.png"]
            assert (folder / "masks_png").is_dir() == (split != "Test")
        assert (tmp_path / ".lpcgma" / f"{split}.ok").read_text().strip() == md5[split]
        assert not (tmp_path / f"{split}.zip").exists()  # deleted after extraction (no --keep-archives)
    assert len(LoveDA(tmp_path, "val", "urban")) == 2 and len(LoveDA(tmp_path, "test", "rural")) == 2


def test_rerun_is_idempotent(server, archives, tmp_path, capsys):
    md5 = serve(server, archives)
    download_loveda(tmp_path, ["Train", "Val"], base_url=server.url, checksums=md5, options=FAST)
    assert len(server.state.requests) == 2
    again = download_loveda(tmp_path, ["Train", "Val"], base_url=server.url, checksums=md5, options=FAST)
    assert again == {"Train": "skipped", "Val": "skipped"} and len(server.state.requests) == 2
    assert "already extracted and verified" in capsys.readouterr().out
    # a split whose folders have gone is fetched again even with its marker in place
    (tmp_path / "Val" / "Urban" / "masks_png").rename(tmp_path / "gone")
    assert download_loveda(tmp_path, ["Val"], base_url=server.url, checksums=md5, options=FAST) == {"Val": "downloaded"}
    assert len(server.state.requests) == 3 and (tmp_path / "Val" / "Urban" / "masks_png" / "1.png").is_file()


def test_checksum_mismatch_is_refused_and_nothing_is_extracted(server, archives, tmp_path):
    md5 = serve(server, archives)
    wrong = {**md5, "Val": "0" * 32}
    with pytest.raises(ChecksumError, match=rf"MD5 {md5['Val']}, expected the published 0{{32}}"):
        download_loveda(tmp_path, ["Val"], base_url=server.url, checksums=wrong, options=FAST)
    assert not (tmp_path / "Val").exists() and not (tmp_path / ".lpcgma").exists()
    assert not (tmp_path / "Val.zip").exists() and not (tmp_path / "Val.zip.part").exists()


def test_interrupted_download_resumes_with_a_range_request(server, archives, tmp_path, capsys):
    md5 = serve(server, archives)
    server.state.drops["/Train.zip"] = 1
    assert download_loveda(tmp_path, ["Train"], base_url=server.url, checksums=md5, options=FAST) == {
        "Train": "downloaded"
    }
    half = len(archives["Train"][0]) // 2
    assert server.state.requests == [("/Train.zip", None), ("/Train.zip", f"bytes={half}-")]
    assert "resuming" in capsys.readouterr().out
    assert (tmp_path / ".lpcgma" / "Train.ok").read_text().strip() == md5["Train"]
    assert len(LoveDA(tmp_path, "train", "urban")) == 2


def test_download_that_keeps_failing_resumes_on_the_next_run(server, archives, tmp_path):
    md5 = serve(server, archives)
    server.state.drops["/Val.zip"] = 10
    with pytest.raises(DownloadError, match="after 3 attempts.*run the command again to resume"):
        download_loveda(tmp_path, ["Val"], base_url=server.url, checksums=md5, options=FAST)
    part = tmp_path / "Val.zip.part"
    kept = part.stat().st_size
    assert 0 < kept < len(archives["Val"][0]) and not (tmp_path / "Val").exists()
    server.state.drops.clear()
    server.state.requests.clear()
    download_loveda(tmp_path, ["Val"], base_url=server.url, checksums=md5, options=FAST)
    assert server.state.requests == [("/Val.zip", f"bytes={kept}-")]
    assert not part.exists() and (tmp_path / "Val" / "Rural" / "masks_png" / "0.png").is_file()


def test_a_server_that_ignores_range_makes_the_download_start_over(server, archives, tmp_path, capsys):
    md5 = serve(server, archives)
    server.state.ignore_range = True
    (tmp_path / "Test.zip.part").write_bytes(b"stale bytes from another file")
    download_loveda(tmp_path, ["Test"], base_url=server.url, checksums=md5, options=FAST, keep_archives=True)
    assert server.state.requests == [("/Test.zip", "bytes=29-")]
    assert "ignored the resume request" in capsys.readouterr().out
    assert (tmp_path / "Test.zip").read_bytes() == archives["Test"][0]


@pytest.mark.parametrize("member", ["../evil.png", "/tmp/lpcgma-evil.png", "Train/../../evil.png"])
def test_path_traversal_member_is_refused(server, tmp_path, member):
    data = zip_bytes({"Train/Rural/images_png/0.png": b"png", member: b"evil"})
    server.state.files["/Train.zip"] = data
    root = tmp_path / "root"
    with pytest.raises(DataError, match="refusing to extract .*outside") as info:
        download_loveda(root, ["Train"], base_url=server.url, checksums={"Train": hashlib.md5(data).hexdigest()},
                        options=FAST)  # fmt: skip
    assert member in str(info.value)
    assert not (root / "Train").exists() and not (tmp_path / "evil.png").exists()
    assert not Path("/tmp/lpcgma-evil.png").exists() and not (root / ".lpcgma").exists()


def test_archive_without_the_official_layout_is_refused(server, tmp_path):
    data = zip_bytes({"images/0.png": b"png"})
    server.state.files["/Val.zip"] = data
    with pytest.raises(DataError, match=r"official LoveDA layout: '.*Val/Rural/images_png' is missing"):
        download_loveda(tmp_path, ["Val"], base_url=server.url, checksums={"Val": hashlib.md5(data).hexdigest()},
                        options=FAST)  # fmt: skip
    assert not (tmp_path / ".lpcgma").exists()


def test_base_url_env_var_is_honoured_by_the_cli(server, archives, tmp_path, monkeypatch, capsys):
    md5 = serve(server, archives, prefix="/mirror/loveda")
    monkeypatch.setitem(dl.LOVEDA_MD5, "Val", md5["Val"])
    monkeypatch.setenv(LOVEDA_URL_ENV, f"{server.url}/mirror/loveda/")
    assert main(["data", "download", "loveda", "--root", str(tmp_path), "--splits", "val", "--quiet"]) == 0
    assert server.state.requests == [("/mirror/loveda/Val.zip", None)]
    out = capsys.readouterr().out
    assert "Val downloaded" in out and "CC BY-NC-SA 4.0" in out
    assert loveda_base_url("https://mirror.example/x/") == "https://mirror.example/x"  # --base-url wins
    monkeypatch.delenv(LOVEDA_URL_ENV)
    assert loveda_base_url() == "https://zenodo.org/records/5706578/files"


def test_http_error_names_the_url(server, tmp_path, capsys):
    args = ["data", "download", "loveda", "--root", str(tmp_path), "--splits", "Test", "--base-url", server.url]
    assert main(args) == 2
    assert f"cannot download {server.url}/Test.zip: HTTP 404" in capsys.readouterr().err


def test_safe_extract_refuses_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "Train.zip").write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DataError, match="'.*Train.zip' is not a readable zip archive"):
        safe_extract(tmp_path / "Train.zip", tmp_path / "out")


# ---------------------------------------------------------------------------------------------- ISPRS


def test_isprs_prints_what_to_request_when_nothing_is_there(tmp_path, capsys):
    assert main(["data", "download", "isprs", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    expected = ["3_Ortho_IRRG.zip", "5_Labels_all_noBoundary.zip", "ISPRS_semantic_labeling_Vaihingen.zip"]
    expected += ["ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", str(tmp_path / "Potsdam")]
    assert all(name in out for name in expected)
    assert "Potsdam 38 tiles, Vaihingen 33 tiles" in out


def test_isprs_bundle_is_extracted_verified_and_prepared(tmp_path, capsys):
    staging = tmp_path / "staging"
    write_isprs_tiles(staging, "potsdam", size=(32, 32))
    bundle = zip_bytes(
        {f"{name}.zip": zip_folder(staging / name) for name in ("3_Ortho_IRRG", "5_Labels_all_noBoundary")}
    )
    root = tmp_path / "isprs"
    (root / "Potsdam").mkdir(parents=True)
    (root / "Potsdam" / "Potsdam.zip").write_bytes(bundle)
    found = download_isprs(root, ["potsdam"])
    assert found["potsdam"] is not None
    assert {s: (t.images, t.labels, t.missing) for s, t in found["potsdam"].items()} == {
        "train": (24, 24, ()),
        "val": (14, 14, ()),
    }
    out = capsys.readouterr().out
    assert out.count("extracting") == 3 and "lpcgma data prepare-isprs --src" in out
    assert main(["data", "download", "isprs", "--root", str(root), "--isprs-datasets", "potsdam"]) == 0
    assert "extracting" not in capsys.readouterr().out  # already extracted: markers
    counts = prepare_isprs(root / "Potsdam", tmp_path / "prepared", "potsdam", patch_size=32)
    assert counts == {"train": 24, "val": 14}


def test_isprs_missing_tiles_are_each_named(tmp_path):
    skip = ("top_mosaic_09cm_area5_noBoundary.tif", "top_mosaic_09cm_area38.tif")
    write_isprs_tiles(tmp_path / "Vaihingen", "vaihingen", size=(16, 16), skip=skip)
    with pytest.raises(DatasetNotFoundError, match="2 tile file") as info:
        download_isprs(tmp_path, ["vaihingen"])
    assert "train: top_mosaic_09cm_area5_noBoundary.tif" in str(info.value)
    assert "val: top_mosaic_09cm_area38.tif" in str(info.value)
