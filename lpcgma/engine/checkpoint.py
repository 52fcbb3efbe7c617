"""Checkpoints: a folder per save (``state.pt`` + ``config.yaml``), written atomically.

Two kinds. A resumable checkpoint (``step_<N>/``) holds the method (student, teacher, method state),
optimiser, scheduler, RNG states and the step, so a stopped run resumes exactly. A model
(`model_state`: ``checkpoints/best``, the MLflow models, the shared source model) holds only the
evaluated network's weights with the step and classes: what evaluation, prediction, promotion and a
warm start load, about a quarter of the size. Files are written to a temporary folder beside the
target and renamed into place: a failed write (disk full, permissions) leaves the previous
checkpoint intact. Loading uses ``torch.load(weights_only=True)``: a crafted pickle is refused.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lpcgma.engine.errors import CheckpointError
from lpcgma.methods.base import model_weights

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_KEYS = ("step", "method_name", "class_names")  # what a model keeps of a training state, with its weights


def model_state(state: dict[str, Any]) -> dict[str, Any]:
    """The model of a training state (or of a model: the same model back): the evaluated network's
    weights (`model_weights`: the weight average when kept, else the student) as ``student.*``, the
    step, method name and classes. No optimiser, teacher, method state or RNG: not resumable."""
    kept = {k: state[k] for k in MODEL_KEYS if k in state}
    kept["method"] = {f"student.{k}": v for k, v in model_weights(state["method"]).items()}
    return kept


def is_model_only(method_state: dict[str, Any]) -> bool:
    """Whether a checkpoint's method state holds the student's weights alone: a model (`model_state`),
    or a method with nothing else to keep (source-only), which evaluates the same way."""
    return bool(method_state) and all(k.startswith("student.") for k in method_state)


def is_model(state: dict[str, Any]) -> bool:
    """Whether a checkpoint state already is a model (`model_state`'s output: ``checkpoints/best``)."""
    return set(state) <= {*MODEL_KEYS, "method"} and is_model_only(state.get("method", {}))


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA) and Python RNG states, in weights_only-loadable types."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_tensor()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = 3, tuple(int(v) for v in state["python"].tolist()), None
    random.setstate((version, internal, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensor() -> torch.Tensor:
    _, internal, _ = random.getstate()
    return torch.tensor(internal, dtype=torch.int64)


def write_checkpoint(directory: str | Path, state: dict[str, Any], config_yaml: str) -> Path:
    """Write `state` and the resolved config into `directory` atomically; return the folder."""
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint folder '{target.parent}': {e.strerror or e}") from e
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        with open(tmp / STATE_FILE, "rb") as f:
            os.fsync(f.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            try:
                tmp.rename(target)
            except OSError:
                old.rename(target)  # the previous checkpoint goes back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint '{target}': {e.strerror or e}") from e
    return target


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint folder (or a ``state.pt`` file) with ``weights_only=True``."""
    path = Path(directory)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at '{file}'")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)  # type: ignore[no-any-return]
    except Exception as e:  # pickle.UnpicklingError for crafted files, RuntimeError for truncated ones
        raise CheckpointError(
            f"'{file}' is not a checkpoint this project can load safely ({_reason(e)}); it loads only "
            "tensors and plain types, so a foreign or crafted pickle is refused"
        ) from e


def _reason(error: Exception) -> str:
    """Why a load failed, in one line, without PyTorch's advice to turn the safety check off: the
    blocked global or opcode of a refused pickle, else the error's first sentence."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if line.startswith(("Trying to load unsupported", "Unsupported"))]
    if found:
        return found[0].rstrip(".")
    if isinstance(error, pickle.UnpicklingError) or not lines:
        return "not a pickle of tensors and plain types"
    return lines[0].split(". ")[0].rstrip(".")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint folder with the highest step under `root`, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def _step_folders(root: str | Path) -> list[Path]:
    """The step folders under `root`, oldest first (``best`` is not one)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []


def drop_step_checkpoints(root: str | Path) -> None:
    """Delete every step folder of a *finished* run (``best`` is kept): what a table or sweep keeps
    once its result is written (a resumable checkpoint of a ResNet-18 LPCGMA run is ≈ 180 MB)."""
    for p in _step_folders(root):
        shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent step folders (``best`` is never touched)."""
    for p in _step_folders(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
