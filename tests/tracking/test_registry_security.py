"""Registered models load without unpickling: a pickle-format model is refused."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from lpcgma.tracking.registry import check_better, list_inputs, load_segmenter


def test_a_pickled_model_is_refused_even_if_the_environment_allows_pickle(
    tmp_path: Path, file_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pickled"
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(path), serialization_format="pickle", pip_requirements=[])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # must not be honoured by lpcgma
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with pytest.raises(MlflowException, match="pickle"):
        load_segmenter(str(path), tracking_uri=file_store)
    # the store given for this call is not left in the environment (MLflow's set_tracking_uri writes it
    # there; later code and subprocesses would then use it)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


class _Version:
    def __init__(self, tags: dict[str, str]) -> None:
        self.version, self.tags = "4", tags


def test_champion_comparison() -> None:
    champ = _Version({"metric": "target_miou", "metric_value": "0.5", "eval_split": "synthetic:urban:val"})
    assert check_better(0.6, "synthetic:urban:val", champ, "target_miou", "max") is None
    assert "not better" in (check_better(0.5, "synthetic:urban:val", champ, "target_miou", "max") or "")
    assert "evaluation split" in (check_better(0.9, "loveda:urban:val", champ, "target_miou", "max") or "")
    assert check_better(0.4, "synthetic:urban:val", _Version({**champ.tags}), "target_miou", "min") is None
    assert check_better(0.1, "x", None, "target_miou", "max") is None


def test_predict_inputs(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_inputs([tmp_path])] == ["a.tif", "b.png"]
    with pytest.raises(FileNotFoundError):
        list_inputs([tmp_path / "missing"])


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR truncated"])
def test_an_unreadable_input_is_named_before_the_model_loads(tmp_path: Path, content: bytes) -> None:
    from lpcgma.tracking.registry import predict_files, read_image

    bad = tmp_path / "tile.png"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read image '.*tile\.png': not a readable PNG, JPEG or TIFF"):
        read_image(bad)
    # the model URI is never opened: the bad file is found first
    with pytest.raises(ValueError, match="tile.png"):
        predict_files("models:/does-not-exist@champion", [bad], tmp_path / "out", tracking_uri="sqlite:///nowhere.db")
    assert not (tmp_path / "out").exists()
