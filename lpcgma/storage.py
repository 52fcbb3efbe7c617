"""Where the project reads and writes outside the process: a local folder or an object store, through
pyarrow's file systems (one module for both users).

- `Location`: a folder that is a local path or ``s3://bucket[/prefix]``, with the S3 options (endpoint
  from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for MinIO or moto, region); plain data that
  pickles to loader workers. Dataset shards (`lpcgma.data.shards`) and the shared source models
  (`lpcgma.engine.source_stage`) live in one. Credentials are left to the AWS SDK (environment,
  config files, instance profile) and never appear in a URI.
- A search's storage root (`normalise_storage`, `join_uri`, `read_text`, `write_text`): a local folder
  or any URI pyarrow and Ray Tune accept (s3://, gs://, file://).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs


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

    def read_text(self, name: str) -> str | None:
        """The text of file `name` in this folder, or None when there is no such file."""
        return _read_text(self.filesystem(), self.join(name))


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
    fs, path = pafs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str | None:
    """The text of the file at `uri` (local path or URI), or None when there is no such file."""
    fs, path = pafs.FileSystem.from_uri(uri)
    return _read_text(fs, path)


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read()).decode()
