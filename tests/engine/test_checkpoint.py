"""Checkpoints: atomic writes, weights_only loading, latest/prune, RNG round trip, the model of a state."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from lpcgma.engine.checkpoint import (
    CheckpointError,
    is_model,
    is_model_only,
    latest_checkpoint,
    model_state,
    prune_checkpoints,
    read_checkpoint,
    rng_state,
    set_rng_state,
    step_dir,
    write_checkpoint,
)


def test_write_read_round_trip_and_latest(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write_checkpoint(step_dir(tmp_path, step), {"step": step, "w": torch.ones(3) * step}, "a: 1\n")
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 30)
    assert read_checkpoint(step_dir(tmp_path, 20))["step"] == 20
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]


def _training_state(average: bool) -> dict[str, object]:
    method = {"student.w": torch.ones(2), "teacher.w": torch.full((2,), 2.0), "gmm.means": torch.zeros(3)}
    if average:
        method["average.net.w"] = torch.full((2,), 3.0)
    return {"step": 7, "method": method, "optimizer": {"state": {}}, "rng": {}, "method_name": "lpcgma",
            "class_names": ["a", "b"], "best_metric": 0.5}  # fmt: skip


@pytest.mark.parametrize(("average", "kept"), [(False, 1.0), (True, 3.0)])
def test_model_state_keeps_the_evaluated_network_alone(average: bool, kept: float) -> None:
    """The student's weights (the weight average's when kept) as student.*, step and classes; nothing
    resumable. A model of a model is the same model, and only a model counts as model-only."""
    state = _training_state(average)
    model = model_state(state)
    assert set(model) == {"step", "method_name", "class_names", "method"}
    assert (model["step"], model["method_name"], model["class_names"]) == (7, "lpcgma", ["a", "b"])
    assert list(model["method"]) == ["student.w"]
    torch.testing.assert_close(model["method"]["student.w"], torch.full((2,), kept))
    assert model_state(model) == model
    assert is_model_only(model["method"]) and not is_model_only(state["method"]) and not is_model_only({})
    assert is_model(model) and not is_model(state) and not is_model({"step": 1})
    source_only_step = {"step": 3, "method": {"student.w": torch.ones(2)}, "optimizer": {"state": {}}}
    assert is_model_only(source_only_step["method"]) and not is_model(source_only_step)  # resumable: not a model


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), random.random())
    torch.testing.assert_close(a[0], b[0])
    assert a[1] == b[1]


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_crafted_pickle_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "step_00000001"
    d.mkdir()
    with open(d / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="not a checkpoint this project can load safely") as err:
        read_checkpoint(d)
    assert "Unsupported" in str(err.value) or "unsupported GLOBAL" in str(err.value)  # the blocked op or global
    assert "weights_only` set to `False" not in str(err.value) and "Re-running" not in str(err.value)


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="blocker"):
        write_checkpoint(blocker / "ckpts" / "step_00000001", {"a": 1}, "")


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = step_dir(tmp_path, 5)
    write_checkpoint(target, {"step": 5}, "")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        write_checkpoint(target, {"step": 6}, "")
    assert read_checkpoint(target)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]  # no temporary folder left


def test_failed_swap_puts_the_previous_checkpoint_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overwriting a checkpoint (``best``) moves the old one aside, then renames the new one in: if
    that last rename fails, the old one is renamed back."""
    target = tmp_path / "best"
    write_checkpoint(target, {"step": 5}, "")
    real_rename = Path.rename

    def rename(self: Path, dst: str | Path) -> Path:
        if Path(dst) == target and not self.name.endswith(".old"):  # the new folder → best
            raise OSError(28, "No space left on device")
        return real_rename(self, dst)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError, match=r"best.*No space left"):
        write_checkpoint(target, {"step": 6}, "")
    assert read_checkpoint(target)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
