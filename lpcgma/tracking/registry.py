"""Promotion of the best trial to the MLflow model registry, and prediction with a registered model.

`promote(search=...)` finds the trial runs of a search (tag ``search``, role ``trial``; or, with
``experiment=...``, every training run of an experiment), picks the best by the best value of the
metric in its history (``target_miou``, max), downloads its ``checkpoints/best`` artifact, reads it
with ``weights_only=True`` and logs ``SegmentationPredictor(DeepLabV2(...))`` with
``mlflow.pytorch.log_model`` into that trial's run, registered as a new version of the model:

- format ``pt2`` (torch.export): loading needs no pickle — MLflow checks that every record of the
  archive loads with ``weights_only=True`` before ``torch.export.load`` and refuses anything else;
  `load_segmenter` never enables ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``;
- input: a normalised float32 batch ``[N, 3, W, W]`` with ``W = train.eval_window`` (a batch-2
  input example, so the batch dimension stays dynamic; the window size is fixed by the export);
  output: class logits ``[N, C, W, W]``;
- beside it (``extra_files``): the run's ``config.yaml`` and ``classes.json`` (class names, palette,
  normalisation); the same facts in the model's ``metadata``.

Aliases: ``champion`` moves to the new version, the version it leaves gets ``previous``. A candidate
that is not better than the champion on the same evaluation split (tag ``eval_split``), or whose
split differs, is refused with `PromotionRefused` unless ``force=True``.

`predict_files(model_uri, inputs, out_dir)` loads a registered model (``models:/NAME@champion``)
and writes one colour-coded PNG per tile, by a sliding window over the whole tile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lpcgma.config import ExperimentConfig, load_config
from lpcgma.engine.checkpoint import CONFIG_FILE, STATE_FILE, read_checkpoint
from lpcgma.engine.label_free import is_better
from lpcgma.methods.base import model_weights
from lpcgma.tracking.offline import retry
from lpcgma.tracking.runs import CLASSES_FILE, EVAL_SPLIT_TAG, ROLE_TAG, SEARCH_TAG, TRIAL_TAG, eval_split_tag
from lpcgma.tracking.store import all_runs, best_over_history, resolve_tracking_uri, tracking_client

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
BEST_CHECKPOINT = "checkpoints/best"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class PromotionRefused(RuntimeError):
    """The candidate is not better than the current champion on the same evaluation split."""


class PromotionError(RuntimeError):
    """Nothing to promote: no such search/experiment, no trial with the metric, no best checkpoint."""


@dataclass
class PromotionResult:
    model_name: str
    version: str
    run_id: str
    metric: str
    value: float
    eval_split: str
    previous_version: str | None
    model_uri: str  # models:/NAME@champion


# --------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    run: Any
    value: float
    step: int

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def _fluent_uri(uri: str) -> Any:
    """MLflow's fluent calls (log_model, download_artifacts) read a process-wide URI, and setting it
    also writes $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI into this process's environment. Set both
    for the call, then put the environment and the tracking URI back: a promotion or a prediction
    must not leave its store behind for what this process (or its children) does next."""
    from mlflow.tracking import set_registry_uri, set_tracking_uri

    saved = {k: os.environ.get(k) for k in _URI_ENV}
    set_tracking_uri(uri)
    set_registry_uri(uri)
    try:
        yield
    finally:
        set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]  # None: unset
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def candidate_runs(client: Any, search: str | None = None, experiment: str | None = None) -> list[Any]:
    """The trial runs of `search` (any experiment), else the training runs of `experiment`."""
    from mlflow.entities import ViewType

    if search:
        exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        quoted = search.replace("'", "\\'")
        runs = all_runs(client, exps, f"tags.{SEARCH_TAG} = '{quoted}' and tags.`{ROLE_TAG}` = 'trial'")
        if runs or not experiment:
            if not runs:
                raise PromotionError(f"no trial runs of search {search!r} in MLflow at {client.tracking_uri}")
            return runs
    assert experiment is not None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PromotionError(f"no search or experiment named {experiment!r} in MLflow at {client.tracking_uri}")
    runs = all_runs(client, [exp.experiment_id], f"tags.`{ROLE_TAG}` != 'search'")
    if not runs:
        raise PromotionError(f"experiment {experiment!r} has no training runs")
    return runs


def best_candidate(client: Any, runs: Sequence[Any], metric: str, mode: str) -> Candidate:
    """The run with the best value of `metric` over its history (FAILED runs excluded)."""
    best: Candidate | None = None
    for run in runs:
        if run.info.status == "FAILED":
            continue
        value, step = retry(best_over_history, client, run.info.run_id, metric, mode)
        if step < 0:  # never logged
            continue
        if best is None or is_better(value, best.value, mode):
            best = Candidate(run, value, step)
    if best is None:
        raise PromotionError(f"none of the {len(runs)} runs has the metric {metric!r} (FAILED runs excluded)")
    return best


def current_champion(client: Any, model_name: str) -> Any | None:
    """The model version with alias ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:
        if e.get_http_status_code() in (400, 404):  # no such model or alias
            return None
        raise


def default_model_name(cfg: ExperimentConfig) -> str:
    d = cfg.data
    return f"lpcgma-{d.dataset}-{d.source_domain}-to-{d.target_domain}"


def check_better(candidate_value: float, candidate_split: str, champion: Any, metric: str, mode: str) -> str | None:
    """Why the candidate may not replace `champion` (None when it may)."""
    if champion is None:
        return None
    tags = champion.tags or {}
    champ_split = tags.get(EVAL_SPLIT_TAG, "")
    champ_metric = tags.get("metric", "")
    try:
        champ_value = float(tags.get("metric_value", "nan"))
    except ValueError:
        champ_value = math.nan
    where = f"champion version {champion.version} ({champ_metric}={champ_value:.4f} on {champ_split or '?'})"
    if champ_metric != metric or champ_split != candidate_split:
        return (
            f"the candidate ({metric}={candidate_value:.4f} on {candidate_split}) cannot be compared "
            f"with the {where}: different metric or evaluation split"
        )
    if not is_better(candidate_value, champ_value, mode):
        return f"the candidate ({metric}={candidate_value:.4f}) is not better than the {where}"
    return None


# ----------------------------------------------------------------------------------- the model
def build_predictor(cfg: ExperimentConfig, state: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """`SegmentationPredictor(DeepLabV2)` with the model of a checkpoint's method state (`model_weights`:
    the weight average when the run kept one, else the student)."""
    from lpcgma.models.deeplab import DeepLabV2, SegmentationPredictor

    m = cfg.model
    net = DeepLabV2(num_classes, m.backbone, False, m.proj_dim, m.aspp_dilations)
    method_state = state["method"]
    weights = model_weights(method_state)
    if not weights:
        raise PromotionError("the checkpoint's method state has no student.* weights")
    net.load_state_dict(weights)
    return SegmentationPredictor(net).eval()


def _classes_from(run_dir: Path, state: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    p = run_dir / CLASSES_FILE
    if p.is_file():
        info: dict[str, Any] = json.loads(p.read_text())
        return info
    from lpcgma.data import classes as dc

    names = list(state.get("class_names") or [])
    known = [dc.LOVEDA_CLASSES, dc.ISPRS_CLASSES, dc.ISPRS_CLASSES_NO_CLUTTER]
    match = next((c for c in known if list(c.names) == names), None)
    palette = (
        [list(rgb) for rgb in match.palette]
        if match
        else [[int(v) for v in np.random.default_rng(i).integers(0, 256, 3)] for i in range(len(names))]
    )
    mean, std = dc.MEAN_STD.get(cfg.data.dataset, (dc.IMAGENET_MEAN, dc.IMAGENET_STD))
    return {"names": names, "palette": palette, "mean": list(mean), "std": list(std)}


def _download_best(client: Any, run_id: str, folder: Path) -> tuple[Path, Path]:
    """Download the run's best checkpoint (and its config and classes, when logged) into `folder`;
    return (checkpoint folder, config file)."""
    try:
        ckpt = Path(client.download_artifacts(run_id, BEST_CHECKPOINT, str(folder)))
    except Exception as e:
        raise PromotionError(f"run {run_id} has no '{BEST_CHECKPOINT}' artifact: {e}") from e
    if not (ckpt / STATE_FILE).is_file():
        raise PromotionError(f"run {run_id}: '{BEST_CHECKPOINT}' has no {STATE_FILE}")
    for name in ("config.yaml", CLASSES_FILE):
        try:
            client.download_artifacts(run_id, name, str(folder))
        except Exception:
            log.info("run %s has no %s artifact", run_id, name)
    cfg_file = folder / "config.yaml" if (folder / "config.yaml").is_file() else ckpt / CONFIG_FILE
    return ckpt, cfg_file


def _model_metadata(
    cfg: ExperimentConfig, classes: dict[str, Any], metric: str, best: Any, split: str
) -> dict[str, Any]:
    """The logged model's metadata: what a predictor needs (classes, normalisation, window) and where it came from."""
    return {
        "class_names": classes["names"],
        "palette": classes["palette"],
        "mean": classes["mean"],
        "std": classes["std"],
        "window": cfg.train.eval_window,
        "stride": cfg.train.eval_stride,
        "scale": cfg.data.eval_scale,
        "input": "float32 [N, 3, window, window], (pixel 0-255 - mean) / std",
        "output": "class logits [N, C, window, window]",
        "metric": metric,
        "metric_value": best.value,
        EVAL_SPLIT_TAG: split,
        "source_run_id": best.run_id,
        "best_step": best.step,
    }


def _version_tags(
    cfg: ExperimentConfig, metric: str, mode: str, best: Any, split: str, checkpoint_step: int
) -> dict[str, str]:
    """The registered version's tags: the selection, its source run (search and trial) and the task."""
    tags = {
        "metric": metric,
        "metric_value": repr(best.value),
        "mode": mode,
        EVAL_SPLIT_TAG: split,
        "source_run_id": best.run_id,
        "best_step": str(best.step),
        "checkpoint_step": str(checkpoint_step),
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "domains": f"{cfg.data.source_domain} → {cfg.data.target_domain}",
    }
    for k in (SEARCH_TAG, TRIAL_TAG):
        if k in best.run.data.tags:
            tags[k] = best.run.data.tags[k]
    return tags


def promote(
    search: str | None = None,
    *,
    experiment: str | None = None,
    metric: str = "target_miou",
    mode: str = "max",
    model_name: str | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
) -> PromotionResult:
    """Register the best trial's best checkpoint and make it the champion (see the module doc)."""
    from mlflow.models import infer_signature
    from mlflow.pytorch import log_model
    from mlflow.tracking.fluent import set_experiment
    from mlflow.version import VERSION as MLFLOW_VERSION

    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if not search and not experiment:
        raise ValueError("promote needs a search name or an experiment name")
    uri = resolve_tracking_uri(None, tracking_uri)
    client = tracking_client(uri)
    runs = retry(candidate_runs, client, search, experiment)
    best = best_candidate(client, runs, metric, mode)
    with tempfile.TemporaryDirectory(prefix="lpcgma-promote-") as tmp:
        t = Path(tmp)
        ckpt, cfg_file = _download_best(client, best.run_id, t)
        cfg = load_config(cfg_file, ["model.pretrained=false"])
        split = best.run.data.tags.get(EVAL_SPLIT_TAG) or eval_split_tag(cfg)
        name = model_name or default_model_name(cfg)
        champion = current_champion(client, name)
        reason = check_better(best.value, split, champion, metric, mode)
        if reason and not force:
            raise PromotionRefused(f"not promoted to {name!r}: {reason}. Use --force to promote anyway.")
        if reason:
            log.warning("promoting despite: %s (--force)", reason)

        state = read_checkpoint(ckpt, map_location="cpu")  # weights_only=True
        classes = _classes_from(t, state, cfg)
        predictor = build_predictor(cfg, state, len(classes["names"]))
        w = cfg.train.eval_window
        example = np.zeros((2, 3, w, w), dtype=np.float32)
        with torch.no_grad():
            out = predictor(torch.from_numpy(example)).numpy()
        (t / CLASSES_FILE).write_text(json.dumps(classes, indent=1))
        metadata = _model_metadata(cfg, classes, metric, best, split)
        version_tags = _version_tags(cfg, metric, mode, best, split, int(state.get("step", -1)))
        with _fluent_uri(uri):
            set_experiment(experiment_id=best.run.info.experiment_id)
            info = log_model(
                predictor,
                name="model",
                registered_model_name=name,
                input_example=example,
                signature=infer_signature(example, out),
                extra_files=[str(cfg_file), str(t / CLASSES_FILE)],
                metadata=metadata,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={MLFLOW_VERSION}"],
                serialization_format="pt2",
                run_id=best.run_id,
            )
    version = str(info.registered_model_version)
    for k, v in version_tags.items():
        retry(client.set_model_version_tag, name, version, k, v)
    previous = None
    if champion is not None and str(champion.version) != version:
        previous = str(champion.version)
        retry(client.set_registered_model_alias, name, PREVIOUS, previous)
    retry(client.set_registered_model_alias, name, CHAMPION, version)
    retry(client.set_tag, best.run_id, "registered_model", f"{name}/{version}")
    return PromotionResult(
        name, version, best.run_id, metric, best.value, split, previous, f"models:/{name}@{CHAMPION}"
    )


# ---------------------------------------------------------------------------------- prediction
@contextmanager
def _no_pickle() -> Any:
    """Load models with MLflow's pickle-free check on, whatever the environment says."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@dataclass
class Segmenter:
    """A loaded registered model with what it needs to predict whole tiles."""

    module: Any  # torch.export GraphModule: normalised [N,3,W,W] → logits [N,C,W,W]
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    mean: Tensor
    std: Tensor
    window: int
    stride: int
    scale: float = 1.0  # test scale: tiles are resized by it before the sliding window (data.eval_scale)

    def logits(self, crops: Tensor) -> Tensor:
        with torch.no_grad():
            return self.module(crops.contiguous())  # type: ignore[no-any-return]

    def predict(self, image: np.ndarray | Tensor, stride: int | None = None) -> np.ndarray:
        """Class ids [H, W] of a whole uint8 RGB tile ([H,W,3] or [3,H,W]) by a sliding window."""
        from lpcgma.engine.evaluate import sliding_window_scores

        x = torch.as_tensor(np.array(image, copy=True))
        if x.ndim == 2:
            x = x[None].expand(3, -1, -1)
        elif x.shape[-1] in (3, 4) and x.shape[0] not in (3, 4):
            x = x[..., :3].permute(2, 0, 1)
        x = (x[:3].float() - self.mean[:, None, None]) / self.std[:, None, None]
        logits = sliding_window_scores(
            self.logits, x, len(self.class_names), self.window, stride or self.stride, scale=self.scale
        )
        return logits.argmax(0).numpy().astype(np.uint8)


def load_segmenter(model_uri: str, tracking_uri: str | None = None) -> Segmenter:
    """Load ``models:/NAME@alias`` (or any MLflow model URI) without unpickling anything."""
    from mlflow.models import Model
    from mlflow.pytorch import load_model

    # isort may take the project's data folder ./mlflow/ for first-party code: keep this line put
    from mlflow.artifacts import download_artifacts  # isort: skip

    uri = resolve_tracking_uri(None, tracking_uri)
    with _fluent_uri(uri), tempfile.TemporaryDirectory(prefix="lpcgma-model-") as tmp:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        meta = Model.load(str(local)).metadata or {}
        with _no_pickle():
            module = load_model(str(local))
    missing = [k for k in ("class_names", "palette", "mean", "std", "window") if k not in meta]
    if missing:
        raise PromotionError(f"model {model_uri} lacks metadata {missing}: it was not registered by `lpcgma promote`")
    return Segmenter(
        module=module,
        class_names=list(meta["class_names"]),
        palette=[tuple(int(c) for c in rgb) for rgb in meta["palette"]],  # type: ignore[misc]
        mean=torch.tensor(meta["mean"], dtype=torch.float32),
        std=torch.tensor(meta["std"], dtype=torch.float32),
        window=int(meta["window"]),
        stride=int(meta.get("stride") or meta["window"]),
        scale=float(meta.get("scale", 1.0)),
    )


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 [H, W, 3] tile (PNG/JPEG/TIFF; the first three bands)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        try:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        except Exception:  # not a TIFF either (tifffile's own message names no file)
            raise ValueError(f"cannot read image '{path}': not a readable PNG, JPEG or TIFF ({first})") from e
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            raise ValueError(f"image '{path}' is {arr.dtype}, expected 8-bit") from e
        return arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)


def list_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in the given folders."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input '{p}' does not exist")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}")
    return files


def predict_files(
    model_uri: str,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    tracking_uri: str | None = None,
    stride: int | None = None,
) -> list[Path]:
    """Colour-coded prediction PNGs (``<out>/<tile stem>.png``) for every input tile."""
    from lpcgma.tracking.plots import colorize, save_png

    files = list_inputs(inputs)
    for f in files:  # every file readable before the model is loaded: one clear line naming a bad one
        read_image(f)
    seg = load_segmenter(model_uri, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        pred = seg.predict(read_image(f), stride)
        written.append(save_png(colorize(pred, seg.palette), out / f"{f.stem}.png"))
    return written


__all__ = [
    "CHAMPION",
    "PREVIOUS",
    "PromotionError",
    "PromotionRefused",
    "PromotionResult",
    "Segmenter",
    "best_candidate",
    "candidate_runs",
    "check_better",
    "current_champion",
    "default_model_name",
    "list_inputs",
    "load_segmenter",
    "predict_files",
    "promote",
    "read_image",
]
