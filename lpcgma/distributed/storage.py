"""A search's storage root: a local folder or a URI (s3://, gs://, file://), read and written with pyarrow."""

from __future__ import annotations

from pathlib import Path


def normalise_storage(storage: str) -> str:
    """An absolute local path, or a URI (s3://, gs://, ...) left as is."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def is_local(storage: str) -> bool:
    """Whether `storage` is on this machine's file system (a path or a file:// URI)."""
    return "://" not in storage or storage.startswith("file://")


def join_uri(storage: str, *parts: str) -> str:
    """`parts` below `storage`, joined with ``/`` (for paths and URIs alike)."""
    return "/".join([storage.rstrip("/"), *parts])


def write_text(uri: str, text: str) -> None:
    """Write `text` to a file at `uri` (local path or URI), creating its folder."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str | None:
    """The text of the file at `uri`, or None when there is no such file."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read()).decode()
