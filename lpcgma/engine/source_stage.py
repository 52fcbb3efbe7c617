"""The shared source stage: one source-only model per source setting, trained once and reused.

The two-stage protocol of SDCA, ProDA and most self-training UDA work: adaptation starts from a
model trained on the labelled source alone. With ``source_stage.enabled`` a run (and every trial of
a search) starts from such a model, obtained by `ensure_source_model`:

- **Content-addressed.** The key is a hash of every resolved config key that changes the source
  model (`source_settings`): the source data and augmentation, the model, the source stage's
  iterations, optimiser (``source_stage.optim``, not the adaptation's ``optim``) and projection
  contrast, the seed, precise BN and mixed precision. Target-side, evaluation, logging, speed-only
  and adaptation keys are left out, so searches over adaptation hyperparameters or target settings
  (a shift-strength curve) share one source model; `searched_source_keys` names the searched keys
  that would not (a search refuses them).
- **Stored** in ``source_stage.store`` (a folder or an ``s3://`` URI; default
  ``runs/source_models``, a search's ``<storage>/source_models``) as ``<key>/model/`` (``state.pt``
  with the student's weights, ``config.yaml``) and ``<key>/source_model.json`` (key, settings,
  SHA-256 of ``state.pt``, metrics), the manifest written last. A model whose manifest is missing,
  unreadable or of another key, or whose ``state.pt`` does not match its checksum, is partial or
  corrupt: it is deleted and retrained, never used.
- **Trained once.** On a local store, concurrent askers (parallel trials, ``--jobs``) take a file
  lock on ``<key>.lock``: exactly one trains, the others wait and read its model. On S3 there is no
  lock: the Tune driver obtains the model before any trial starts; a remote model is downloaded to a
  local cache and checked against its checksum before use.

The training is an ordinary `Trainer` run of ``method.name=source_only`` (`stage_config`) in
``<key>/run`` (local store: its logs and ``checkpoints/best`` are kept, its resumable step checkpoints
deleted once the model is written) or a temporary folder (S3), with the caller's callbacks (MLflow); the
caller's random number generators are restored afterwards, so a run that trained the source model
continues exactly like one that found it cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from lpcgma.config import ConfigError, ExperimentConfig, dump_config, flatten, replace, to_dict
from lpcgma.engine.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    drop_step_checkpoints,
    latest_checkpoint,
    model_state,
    read_checkpoint,
    write_checkpoint,
)

if TYPE_CHECKING:
    from lpcgma.engine.trainer import Callback
    from lpcgma.storage import Location

DEFAULT_STORE = "runs/source_models"
MANIFEST_FILE = "source_model.json"
MODEL_DIR = "model"
FORMAT_VERSION = 1
# Config keys that do not change the source model (prefixes end with "."): the target side, what
# and how is evaluated, logging, speed-only settings and the source stage's own switches (its
# iterations, LR and projection contrast enter through the stage config's train/optim/method keys).
_NOT_HASHED = (
    "data.target_domain",
    "data.target_train_split",
    "data.target_eval_split",
    "data.source_eval_split",
    "data.target_labels",
    "data.eval_max_tiles",
    "data.eval_scale",
    "data.num_workers",
    "data.cache_tiles",
    "data.rcs_temperature",  # the stage samples tiles uniformly
    "data.synthetic_target_sensor",
    "data.synthetic_shift",
    "data.synthetic_target_palette",
    "data.synthetic_target_layouts",
    "data.synthetic_target_textures",
    "model.ema_momentum",
    "model.init_checkpoint",
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.device",
    "train.channels_last",
    "train.compile",
    "train.eval_window",
    "train.eval_stride",
    "train.out_dir",
    "train.resume",
    "train.progress",
    "train.select_by",
    "train.label_free_tiles",
    "train.snd_pixels",
    "train.source_eval_tiles",
    "train.eval_ema",  # the stage keeps no weight average (`stage_config`)
    "source_stage.",
    "tracking.",
)
# Keys added after source models were first cached: they enter the key only when set to something
# other than their default, so that a model cached before they existed keeps its key.
_HASHED_WHEN_SET = ("data.source_blur_prob", "data.source_noise_prob", "data.source_noise_std")
# Model settings a warm start must share with the checkpoint it starts from.
MODEL_KEYS = ("backbone", "proj_dim", "aspp_dilations")


class SourceModelError(RuntimeError):
    """The source model could not be obtained (missing where it cannot be trained, or unwritable)."""


@dataclass(frozen=True)
class SourceModel:
    """A source model ready to start from."""

    key: str
    uri: str  # its folder in the store (local path or s3:// URI)
    checkpoint: Path  # a local checkpoint folder (state.pt + config.yaml) to load
    manifest: dict[str, Any]  # the stored source_model.json
    trained: bool  # True when this call trained it, False when it came from the store


# ------------------------------------------------------------------------------------ config
def stage_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The source-only run of `cfg`'s source stage: same data and model; the stage's iterations,
    optimiser (``source_stage.optim``) and projection contrast; uniform tile sampling (rare-class
    sampling belongs to adaptation, and searches vary it); no weight average; from scratch (or
    ImageNet weights)."""
    ss = cfg.source_stage
    return replace(
        cfg,
        {
            "method": {"name": "source_only", "lambda_proj": ss.projection_contrast},
            "optim": to_dict(ss.optim),
            "train.iters": ss.iters,
            "train.eval_every": max(1, ss.iters // 4),  # four evaluations (its MLflow curves)
            "train.checkpoint_every": max(1, ss.iters // 4),
            "data.rcs_enabled": False,
            "model.init_checkpoint": "",
            "train.eval_ema": 0.0,  # the source model is the stage's last student (its LR decays to 0)
            "source_stage.enabled": False,
        },
    )


def source_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved keys of `cfg`'s source stage that change the source model (hashed into its key)."""
    flat = flatten(stage_config(cfg))
    defaults = flatten(ExperimentConfig())
    unset = {k for k in _HASHED_WHEN_SET if flat[k] == defaults[k]}
    return {k: v for k, v in sorted(flat.items()) if not _unhashed(k) and k not in unset}


def _unhashed(key: str) -> bool:
    return any(_matches(key, n) for n in _NOT_HASHED)


def _matches(key: str, name: str) -> bool:
    """`key` is `name`, or lies under it when `name` is a section prefix ending with a dot."""
    return key == name or (name.endswith(".") and key.startswith(name))


def searched_source_keys(cfg: ExperimentConfig, searched: Sequence[str]) -> list[str]:
    """The searched keys that would change the source model from trial to trial (a search refuses
    them): source-stage keys and the data, model and train keys the source model depends on. The
    stage's optimiser and method come from ``source_stage``, so ``optim.*`` and ``method.*`` never do."""
    if not cfg.source_stage.enabled:
        return []
    settings = [k for k in source_settings(cfg) if not k.startswith(("optim.", "method."))]
    return [k for k in searched if k.startswith("source_stage.") or k in settings]


def check_searchable(cfg: ExperimentConfig, searched: Sequence[str]) -> None:
    """Raise ConfigError when a searched key would give trials different source models."""
    bad = searched_source_keys(cfg, searched)
    if bad:
        raise ConfigError(
            f"search space key(s) {bad} change the shared source model (source_stage.enabled=true), which every "
            "trial must share: fix them in the config, or search them with source_stage.enabled=false"
        )


def source_key(cfg: ExperimentConfig) -> str:
    """The content address of `cfg`'s source model: 16 hex digits of the SHA-256 of its settings."""
    text = json.dumps(source_settings(cfg), sort_keys=True, default=str)
    return hashlib.sha256(f"v{FORMAT_VERSION}:{text}".encode()).hexdigest()[:16]


def store_location(cfg: ExperimentConfig) -> Location:
    """Where `cfg`'s source models live (``source_stage.store``, else `DEFAULT_STORE`)."""
    from lpcgma.storage import Location, LocationError

    try:
        return Location.parse(cfg.source_stage.store or DEFAULT_STORE)
    except LocationError as e:
        raise ConfigError(f"config key 'source_stage.store' = {cfg.source_stage.store!r} is invalid: {e}") from e


def check_model_compatible(cfg: ExperimentConfig, checkpoint: str | Path, class_names: Sequence[str]) -> None:
    """Raise ConfigError, naming both, when the checkpoint's model settings or classes differ from `cfg`'s."""
    folder = Path(checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"checkpoint '{folder}' has no {CONFIG_FILE}: its model settings cannot be checked")
    try:
        theirs = yaml.safe_load(config_file.read_text())["model"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint '{folder}': {CONFIG_FILE} is unreadable ({e})") from e
    ours = flatten(cfg)
    for key in MODEL_KEYS:
        mine, other = ours[f"model.{key}"], theirs.get(key)
        if mine != other:  # flatten and YAML both give lists for tuples
            raise ConfigError(
                f"checkpoint '{folder}' was trained with model.{key}={other!r}, this run has model.{key}={mine!r}: "
                "start from a checkpoint of the same model"
            )
    stored = read_checkpoint(folder).get("class_names")
    if stored is not None and list(stored) != list(class_names):
        raise ConfigError(
            f"checkpoint '{folder}' was trained on the classes {list(stored)}, this run has {list(class_names)}"
        )


# ------------------------------------------------------------------------------------- store
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(location: Location, key: str) -> dict[str, Any] | None:
    """The stored manifest of `key`, or None when it is missing, unreadable or not this key's."""
    try:
        text = location.read_text(f"{key}/{MANIFEST_FILE}")
        if text is None:
            return None
        manifest = json.loads(text)
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("key") == key and manifest.get("format_version") == FORMAT_VERSION
    return manifest if ok and isinstance(manifest.get("sha256"), str) else None


def _local_copy(location: Location, key: str, manifest: dict[str, Any]) -> Path | None:
    """A local checkpoint folder of the stored model whose state.pt matches the manifest's checksum,
    or None (missing or corrupt). Remote models are downloaded into a local cache first."""
    import pyarrow.fs as pafs

    if location.s3 is None:
        folder = Path(location.join(f"{key}/{MODEL_DIR}"))
    else:
        from lpcgma.storage import Location

        cache = Location.parse(Path(tempfile.gettempdir()) / "lpcgma-source-models")
        folder = Path(cache.join(f"{key}/{MODEL_DIR}"))
        with _key_lock(cache, key):  # trials of one node download it once
            state = folder / STATE_FILE
            if not (state.is_file() and _sha256(state) == manifest["sha256"]):
                folder.mkdir(parents=True, exist_ok=True)
                fs = location.filesystem()
                for name in (STATE_FILE, CONFIG_FILE):
                    remote = location.join(f"{key}/{MODEL_DIR}/{name}")
                    if fs.get_file_info(remote).type != pafs.FileType.File:
                        return None
                    with fs.open_input_stream(remote) as src, open(folder / f".{name}.part", "wb") as dst:
                        shutil.copyfileobj(src, dst)  # type: ignore[misc]
                    (folder / f".{name}.part").rename(folder / name)
    state = folder / STATE_FILE
    if not (state.is_file() and (folder / CONFIG_FILE).is_file()) or _sha256(state) != manifest["sha256"]:
        return None
    return folder


def _delete(location: Location, key: str) -> None:
    import pyarrow.fs as pafs

    fs = location.filesystem()
    path = location.join(key)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _publish(location: Location, key: str, model: Path, manifest: dict[str, Any]) -> None:
    """Copy the model folder into the store (remote) and write the manifest last."""
    fs = location.filesystem()
    fs.create_dir(location.join(f"{key}/{MODEL_DIR}"), recursive=True)
    if location.s3 is not None:
        for name in (STATE_FILE, CONFIG_FILE):
            remote = location.join(f"{key}/{MODEL_DIR}/{name}")
            with open(model / name, "rb") as src, fs.open_output_stream(remote) as dst:
                shutil.copyfileobj(src, dst)  # type: ignore[misc]
    text = json.dumps(manifest, indent=1, default=str)
    if location.s3 is None:
        final = Path(location.join(f"{key}/{MANIFEST_FILE}"))
        tmp = final.with_name(f".{MANIFEST_FILE}.part")
        tmp.write_text(text)
        tmp.rename(final)  # atomic: a reader sees no manifest or a whole one
    else:
        with fs.open_output_stream(location.join(f"{key}/{MANIFEST_FILE}")) as f:
            f.write(text.encode())


@contextlib.contextmanager
def _key_lock(location: Location, key: str) -> Iterator[None]:
    """An exclusive lock on `key` across processes of this machine (local stores; none on S3)."""
    if location.s3 is not None:
        yield
        return
    root = Path(location.path)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _caller_rng() -> Iterator[None]:
    """Restore the caller's torch, Python and NumPy generators (and torch threads) afterwards."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- training
def _train(
    cfg: ExperimentConfig,
    run_dir: Path,
    callbacks: Callable[[ExperimentConfig], Sequence[Callback]] | None,
) -> tuple[Path, dict[str, Any]]:
    """Train the source stage of `cfg` in `run_dir`; return (slim model folder, final metrics)."""
    from lpcgma.engine.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)  # a partial run is never continued
    stage = replace(stage_config(cfg), {"train.out_dir": str(run_dir), "train.resume": False})
    with _caller_rng():
        result = Trainer(stage, list(callbacks(stage)) if callbacks else []).fit()
    last = result.last_checkpoint or latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        raise SourceModelError(f"the source stage in '{run_dir}' wrote no checkpoint")
    model = write_checkpoint(run_dir / MODEL_DIR, model_state(read_checkpoint(last)), dump_config(stage))
    drop_step_checkpoints(run_dir / "checkpoints")  # never resumed (a partial run is retrained): the model is kept
    return model, dict(result.final_metrics)


def ensure_source_model(
    cfg: ExperimentConfig,
    callbacks: Callable[[ExperimentConfig], Sequence[Callback]] | None = None,
    allow_training: bool = True,
    log: Callable[[str], None] = print,
) -> SourceModel:
    """`cfg`'s source model from the store, trained there first when it is missing, partial or corrupt.

    `callbacks(stage_cfg)` gives the source-stage run's callbacks (e.g. its MLflow run).
    With ``allow_training=False`` (a distributed rank) a missing model is an error.
    """
    key = source_key(cfg)
    location = store_location(cfg)
    where = location.show(key)
    with _key_lock(location, key):
        manifest = _read_manifest(location, key)
        if manifest is not None:
            local = _local_copy(location, key, manifest)
            if local is not None:
                return SourceModel(key, where, local, manifest, trained=False)
            log(f"source model {where}: state.pt is missing or does not match its checksum; retraining it")
        if not allow_training:
            raise SourceModelError(
                f"no valid source model at {where}: train it before a distributed run (lpcgma train, a search's driver)"
            )
        _delete(location, key)
        log(f"source stage: training source model {key} ({cfg.source_stage.iters} iterations) into {where}")
        t0 = time.time()
        with contextlib.ExitStack() as stack:
            if location.s3 is None:
                run_dir = Path(location.join(key)) / "run"
            else:
                run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lpcgma-source-"))) / "run"
            model, metrics = _train(cfg, run_dir, callbacks)
            manifest = {
                "format_version": FORMAT_VERSION,
                "key": key,
                "settings": source_settings(cfg),
                "sha256": _sha256(model / STATE_FILE),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "train_seconds": round(time.time() - t0, 1),
                # the same key trained with another thread count, torch build or CPU instruction set is
                # another draw (floating-point kernels and summation order), whose target score can
                # differ by points (RESULTS.md, session 24: the demo's key gave 42.6 on one machine, 39.9 on another)
                "trained_with": trained_with(),
                "metrics": metrics,  # its last evaluation, on the target of the config that trained it:
                "metrics_target": {k: v for k, v in flatten(cfg).items() if k.startswith("data.") and _unhashed(k)},
            }
            if location.s3 is None:
                final = Path(location.join(f"{key}/{MODEL_DIR}"))
                shutil.rmtree(final, ignore_errors=True)
                model.rename(final)
                model = final
            _publish(location, key, model, manifest)
        local = _local_copy(location, key, manifest)
        if local is None:
            raise SourceModelError(f"the source model written to {where} does not read back intact")
        return SourceModel(key, where, local, manifest, trained=True)


def trained_with() -> dict[str, str | int]:
    """What besides the config decides a trained model's floats: the torch build, its threads and the
    CPU kernels it dispatches to (`AVX2`, `AVX512`, ...)."""
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def evaluate_source_model(cfg: ExperimentConfig, model: SourceModel) -> dict[str, float]:
    """`model`'s metrics under `cfg`'s data and evaluation settings (its target, not the one it was
    stored with): the source-only reference a search's trials are compared with."""
    from lpcgma.engine.evaluator import evaluate_checkpoint

    with _caller_rng():  # building the method draws initial weights
        metrics, _, _ = evaluate_checkpoint(stage_config(cfg), read_checkpoint(model.checkpoint)["method"])
    return metrics
