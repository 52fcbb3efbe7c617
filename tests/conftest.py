"""Fixtures shared by the tests: the real LoveDA sample of ../shared, when this machine has it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
