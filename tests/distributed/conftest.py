"""Fixtures for the Ray tests: an isolated temp folder for Ray, and cleanup of what Ray started.

Every Ray test points TMPDIR/RAY_TMPDIR into a short folder of its own (Unix socket paths must stay
short), turns usage statistics off, and on teardown shuts Ray down and stops, by PID, any process
still running from that folder (found by its command line or environment) — never by name.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from raytest_helpers import pids_using, stop_pids


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private temp folder for Ray (TMPDIR, RAY_TMPDIR); Ray and its processes stopped after."""
    root = Path(tempfile.mkdtemp(prefix="lr", dir="/tmp"))
    (root / "tmp").mkdir()
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("TMPDIR", str(root / "tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(root / "ray"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(root)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield root
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for _ in range(3):  # late-exiting workers can still write into the folder: repeat
            stop_pids(pids_using(str(root)))
            shutil.rmtree(root, ignore_errors=True)
            time.sleep(1.0)
            if not root.exists() and not pids_using(str(root)):
                break
        tempfile.tempdir = None
