"""Fixtures shared by the tests: the real LoveDA sample of ../shared (when this machine has it) and a
real moto S3 server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import MotoServer

REPO = Path(__file__).resolve().parents[1]

# Ctrl-C must stop the suite at once, even inside an in-process Ray Tune search: Tune's own SIGINT
# handler would turn the first Ctrl-C into a graceful stop of that search and let the suite go on.
# Pytest then tears the fixtures down, which stops every Ray and MLflow process they started (by
# PID). Tests of a user's Ctrl-C on `lpcgma tune` give their subprocess an environment without it.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def shared_dir() -> Path | None:
    """$LPCGMA_SHARED_DIR, else ``shared/`` inside the repo, else ``shared/`` beside the repo."""
    env = os.environ.get("LPCGMA_SHARED_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "shared", REPO.parent / "shared"]
    return next((c for c in candidates if c.is_dir()), None)


@pytest.fixture(scope="session")
def loveda_sample() -> Path:
    """The real LoveDA tiles (Train/Rural) of the shared data folder; skips when absent."""
    shared = shared_dir()
    root = shared / "data" / "loveda_sample" if shared else None
    if root is None or not (root / "Train" / "Rural" / "images_png").is_dir():
        pytest.skip(
            "real LoveDA sample not found (set LPCGMA_SHARED_DIR to the folder holding data/loveda_sample)"
        )
    return root


@pytest.fixture
def moto_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """A real moto S3 server on 127.0.0.1 with bucket `lpcgma-shards`, stopped by PID afterwards."""
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    server = MotoServer(tmp_path / "moto").start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="lpcgma-shards")
        yield server
    finally:
        server.stop()
