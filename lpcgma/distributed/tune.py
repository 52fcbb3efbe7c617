"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over the complete adaptation trainer.

One search = one Tuner. Each trial is a plain function (the "driver", Ray 2.60 Train V2 style):

* a single-worker trial runs the `Trainer` inline in the trial process — no Train worker group,
  which would cost ≈ 13 s per trial here — and reports with ``ray.tune.report``; the trial asks
  Tune for the worker's CPUs/GPUs itself;
* a multi-worker trial builds a `TorchTrainer` (`lpcgma.distributed.train.fit_distributed`) with
  ``TuneReportCallback``; the driver holds only the custom resource ``trial_driver`` so that it
  never takes a CPU its workers need. A local cluster declares ``trial_driver`` itself; an
  existing cluster (``--address``) must declare it on the (non-spot) head node, e.g.
  ``ray start --head --resources='{"trial_driver": 8}'`` (clusters/aws.yaml does).

`OptunaSearch` (TPE, seeded) proposes configs, the literature defaults (the base config's values)
first via ``points_to_evaluate``; ASHA stops poor trials at each evaluation (``training_iteration``
counts evaluations). ``max_concurrent_trials`` comes from the cluster's resources and the per-trial
worker shape, and a search that cannot fit even one trial is refused before it starts.

The search writes ``lpcgma_search.json`` (the resolved base config, search space and settings) into
its experiment folder, so ``--resume`` needs only ``--storage`` and ``--name``: ``Tuner.restore``
keeps finished trials and the searcher's history and reruns only what was unfinished.

MLflow hooks: `run_search` takes ``on_search_start(info) -> parent run id | None`` and
``on_search_end(info, outcome)`` (`mlflow_hooks()` gives the ones of ``lpcgma.tracking.search``).
The parent run id (from the hook, ``--parent-run-id`` or ``$LPCGMA_PARENT_RUN_ID``) reaches every
trial, whose MLflow run becomes its child. ASHA-stopped trials never run code after their last
report, so ending their MLflow runs is ``on_search_end``'s job; an interrupted search skips it and
leaves the parent run open for ``--resume``.

The literature-defaults trial is never stopped early (`DefaultsProtectedASHA`), so the summary
compares the best trial with the defaults at full length. On the head of a ``ray up`` cluster (or
with ``$RAY_ADDRESS``) a search joins the running cluster even without ``--address``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lpcgma.config import ConfigError, ExperimentConfig, load_config, replace, resolve_config_path
from lpcgma.distributed.credentials import credentials_out_of_env
from lpcgma.distributed.search_space import SearchSpace, defaults_point, load_search_space, parse_search_space
from lpcgma.distributed.source_model import obtain_source_model, with_search_store

DRIVER_RESOURCE = "trial_driver"
SEARCH_FILE = "lpcgma_search.json"
DIVERGED_FILE = "non_finite_loss.txt"  # in a trial's run folder: why it diverged (its retries fail at once)
PARENT_RUN_ENV = "LPCGMA_PARENT_RUN_ID"
STORAGE_ENV = "LPCGMA_STORAGE"  # default --storage (clusters/lpcgma.env sets it on the cluster)
# What --smoke-test changes (user overrides still win): a few tiny steps on a small model.
SMOKE_OVERRIDES: tuple[str, ...] = (
    "train.iters=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "data.eval_max_tiles=2",
    "data.num_workers=0",
    "data.crop_size=64",
    "data.batch_size=2",
    "model.backbone=resnet18",
    "model.pretrained=false",
    "tracking.log_overlays=0",
    "source_stage.iters=2",  # a tiny source stage when one is asked for
)
SMOKE_MAX_SAMPLES = 3
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # present on the head of a `ray up` cluster


class ResourceError(ValueError):
    """The search asks for more than the cluster has; the message says what and how much."""


# =========================================================================== resource planning
@dataclass(frozen=True)
class NodeShape:
    """What one Ray node offers (logical resources)."""

    cpus: float
    gpus: float = 0.0
    trial_drivers: float = 0.0
    name: str = "node"


@dataclass(frozen=True)
class ResourcePlan:
    """How trials are placed and how many run at once."""

    max_concurrent: int  # trials running at the same time
    inline: bool  # single-worker trials run the Trainer in the trial process
    trial_resources: dict[str, float]  # what the Tune trial itself requests
    worker_slots: int  # workers of the requested shape that fit the cluster
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        kind = "inline (no worker group)" if self.inline else "TorchTrainer worker group"
        lines = [
            f"trials: {kind}; trial requests {self.trial_resources}; "
            f"{self.worker_slots} worker slot(s) → max {self.max_concurrent} concurrent trial(s)"
        ]
        return "\n".join(lines + list(self.notes))


def _fmt(x: float) -> str:
    return f"{x:g}"


def plan_resources(
    nodes: Sequence[NodeShape],
    workers_per_trial: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_concurrent: int | None = None,
) -> ResourcePlan:
    """Trials that fit `nodes` at once, or ResourceError when not even one does.

    A worker needs `cpus_per_worker` CPUs and `gpus_per_worker` GPUs on one node; workers of a
    trial may spread over nodes. Multi-worker trials also need one ``trial_driver`` each.
    """
    w, c, g = workers_per_trial, cpus_per_worker, gpus_per_worker
    if w < 1:
        raise ResourceError(f"workers per trial must be >= 1, got {w}")
    if not c > 0:
        raise ResourceError(f"CPUs per worker must be > 0, got {c}")
    if g < 0:
        raise ResourceError(f"GPUs per worker must be >= 0, got {g}")
    if g > 1 and not float(g).is_integer():
        raise ResourceError(f"GPUs per worker above 1 must be a whole number, got {g}")
    if w > 1 and 0 < g < 1:
        raise ResourceError(
            f"fractional GPUs per worker ({_fmt(g)}) with {w} workers per trial: NCCL refuses two ranks on "
            "one GPU (ray#48012); share GPUs only between single-worker trials"
        )
    if max_concurrent is not None and max_concurrent < 1:
        raise ResourceError(f"max concurrent trials must be >= 1, got {max_concurrent}")
    if not nodes:
        raise ResourceError("the Ray cluster has no alive nodes")
    shape = f"{_fmt(c)} CPU" + (f" + {_fmt(g)} GPU" if g else "")
    biggest_cpu = max(n.cpus for n in nodes)
    biggest_gpu = max(n.gpus for n in nodes)
    if g > biggest_gpu:
        raise ResourceError(
            f"each worker asks for {_fmt(g)} GPU(s) but the largest node has {_fmt(biggest_gpu)} "
            f"(nodes: {_nodes_text(nodes)})"
        )
    if c > biggest_cpu:
        raise ResourceError(
            f"each worker asks for {_fmt(c)} CPU(s) but the largest node has {_fmt(biggest_cpu)} "
            f"(nodes: {_nodes_text(nodes)})"
        )

    def slots(n: NodeShape) -> int:
        s = math.floor(n.cpus / c + 1e-9)
        if g > 0:
            s = min(s, math.floor(n.gpus / g + 1e-9))
        return max(0, s)

    worker_slots = sum(slots(n) for n in nodes)
    fits = worker_slots // w
    if fits < 1:
        raise ResourceError(
            f"a trial needs {w} worker(s) × ({shape}) but only {worker_slots} such worker(s) fit the cluster "
            f"(nodes: {_nodes_text(nodes)}); lower --workers-per-trial or the per-worker resources"
        )
    notes: list[str] = []
    inline = w == 1
    if inline:
        trial_resources = {"cpu": c, "gpu": g}
    else:
        drivers = math.floor(sum(n.trial_drivers for n in nodes) + 1e-9)
        if drivers < 1:
            raise ResourceError(
                f"multi-worker trials need the custom resource '{DRIVER_RESOURCE}' for their driver and no "
                f"node declares it: start the head with --resources='{{\"{DRIVER_RESOURCE}\": 8}}' "
                "(clusters/aws.yaml does)"
            )
        if drivers < fits:
            notes.append(f"limited by {drivers} '{DRIVER_RESOURCE}' slot(s)")
        fits = min(fits, drivers)
        trial_resources = {DRIVER_RESOURCE: 1.0}
    if max_concurrent is not None:
        if max_concurrent > fits:
            notes.append(f"--max-concurrent {max_concurrent} lowered to {fits}: more would only wait for resources")
        fits = min(fits, max_concurrent)
    return ResourcePlan(fits, inline, trial_resources, worker_slots, tuple(notes))


def _nodes_text(nodes: Sequence[NodeShape]) -> str:
    return ", ".join(f"{n.name}: {_fmt(n.cpus)} CPU/{_fmt(n.gpus)} GPU" for n in nodes[:8]) + (
        f", … ({len(nodes)} nodes)" if len(nodes) > 8 else ""
    )


def cluster_nodes() -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive", False):
            continue
        r = n.get("Resources", {})
        out.append(
            NodeShape(
                cpus=float(r.get("CPU", 0.0)),
                gpus=float(r.get("GPU", 0.0)),
                trial_drivers=float(r.get(DRIVER_RESOURCE, 0.0)),
                name=str(n.get("NodeManagerAddress", "node")),
            )
        )
    return out


def local_storage_warning(storage: str, nodes: Sequence[NodeShape]) -> str | None:
    """A warning when trials may run on several nodes but `storage` is a local folder: each node
    then writes its trials' results and checkpoints to its own disk, where the driver and a resumed
    search cannot read them. None when the search is single-node or its storage is shared (s3://…)."""
    if len(nodes) <= 1 or not _is_local(storage):
        return None
    return (
        f"warning: {len(nodes)} nodes but --storage '{storage}' is a local folder: trials on other nodes "
        "write results and checkpoints to their own disks; use shared storage (e.g. --storage s3://bucket/prefix)"
    )


def autoscaler_nodes(path: str | Path = BOOTSTRAP_CONFIG) -> list[NodeShape]:
    """Worker nodes the autoscaler may still add (declared node types × max_workers).

    Present only on the head of a cluster started by ``ray up``; types without declared CPU/GPU
    resources are skipped. Counts every declared worker even if some are already up, so the plan may
    over-estimate (extra trials then wait for resources; nothing deadlocks, since trial drivers use
    the ``trial_driver`` resource).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        return []
    try:
        cfg = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    head = cfg.get("head_node_type")
    out: list[NodeShape] = []
    for name, spec in (cfg.get("available_node_types") or {}).items():
        if name == head or not isinstance(spec, Mapping):
            continue
        r = spec.get("resources") or {}
        if "CPU" not in r:
            continue
        n = min(int(spec.get("max_workers", 0) or 0), 64)
        shape = NodeShape(
            float(r["CPU"]), float(r.get("GPU", 0)), float(r.get(DRIVER_RESOURCE, 0)), f"{name} (autoscaled)"
        )
        out += [shape] * n
    return out


# =========================================================================== settings
@dataclass
class SearchSettings:
    """Everything a search needs; the CLI and the experiment scripts fill it from arguments."""

    config: str = "synthetic"  # base config: file or packaged name
    search_space: str = "smoke"  # search space: file or packaged name
    overrides: list[str] = field(default_factory=list)  # dotted key=value applied to the base config
    num_samples: int = 8  # trials
    workers_per_trial: int = 1  # Ray Train workers per trial (1 = inline, no worker group)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    objective: str = "target_miou"  # a criterion of lpcgma.engine.label_free.CRITERIA or a reported metric key
    mode: str = ""  # max | min; "" = the objective's mode in CRITERIA (max for other metric keys)
    storage: str = "runs/tune"  # local folder or s3://bucket/prefix
    name: str = ""  # experiment name ("" = <method>_<dataset>_<time>)
    resume: bool = False  # restore the search `name` under `storage`
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:PORT"); None = start a local one
    max_concurrent: int | None = None  # cap on concurrent trials (default: what the cluster fits)
    seed: int = 0  # Optuna TPE seed
    n_startup_trials: int | None = None  # TPE random start-up trials (None: about a third of num_samples)
    grace_period: int = 1  # ASHA: evaluations before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA halving rate
    max_failures: int = 1  # restarts of a failed trial (Tune) or worker group (Train), from the last checkpoint
    smoke_test: bool = False  # tiny trials (SMOKE_OVERRIDES) and at most SMOKE_MAX_SAMPLES of them
    parent_run_id: str | None = None  # MLflow parent run for the trials (else on_search_start / $LPCGMA_PARENT_RUN_ID)
    num_cpus: int | None = None  # local cluster only: CPUs to give Ray (default: all)
    num_gpus: int | None = None  # local cluster only: GPUs to give Ray (default: detected)
    ray_temp_dir: str | None = None  # local cluster only: Ray's temp folder (default: $RAY_TMPDIR or Ray's)
    top_k: int = 3  # trials shown in the final summary
    verbose: int = 1  # Ray Tune's console verbosity (0-3)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (sent to trial processes; plain data only)."""

    base: dict[str, Any]  # the resolved base config (flat dotted dict)
    searched: tuple[str, ...]  # dotted keys sampled per trial
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    storage: str  # normalised storage root
    name: str  # experiment name
    parent_run_id: str | None = None


@dataclass
class SearchInfo:
    """Handed to the MLflow hooks."""

    name: str
    storage: str
    experiment_path: str  # storage/name
    base_config: ExperimentConfig
    space: SearchSpace
    defaults: dict[str, Any]
    settings: SearchSettings
    parent_run_id: str | None = None  # set once on_search_start has run


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # finished | stopped early | error
    best: float | None  # best objective over the trial's evaluations
    evaluations: int
    params: dict[str, Any]
    checkpoint: str | None
    out_dir: str | None
    is_defaults: bool
    error: str | None = None  # why a failed trial failed (first line of its exception)


@dataclass
class SearchOutcome:
    experiment_path: str
    objective: str
    mode: str
    trials: list[TrialSummary]
    results: Any = None  # ray.tune.ResultGrid
    complete: bool = True  # False when the search was interrupted before all trials ended
    source_model: dict[str, Any] | None = None  # the shared source model every trial started from

    def ranked(self) -> list[TrialSummary]:
        sign = -1.0 if self.mode == "max" else 1.0
        scored = [t for t in self.trials if t.best is not None]
        return sorted(scored, key=lambda t: sign * float(t.best))  # type: ignore[arg-type]

    @property
    def best(self) -> TrialSummary | None:
        r = self.ranked()
        return r[0] if r else None

    @property
    def defaults(self) -> TrialSummary | None:
        return next((t for t in self.trials if t.is_defaults), None)

    @property
    def stopped_early(self) -> int:
        return sum(t.status == "stopped early" for t in self.trials)

    def _against_source_model(self) -> list[str]:
        """The source-only model every trial started from, beside the defaults and the best trial."""
        if self.source_model is None:
            return []
        reference = self.source_model.get("metrics", {}).get(self.objective)
        if reference is None:
            return [f"source model {self.source_model['key']}: {self.objective} not reported"]
        lines = ["", f"| model | {self.objective} | vs source-only |", "|---|---|---|"]
        lines.append(f"| source-only (shared source model {self.source_model['key']}) | {reference:.4f} | |")
        for label, trial in (("literature defaults", self.defaults), ("best trial", self.best)):
            if trial is not None and trial.best is not None:
                delta = float(trial.best) - float(reference)
                lines.append(f"| {label} ({trial.trial_id}) | {trial.best:.4f} | {delta:+.4f} |")
        return lines

    def format(self, top_k: int = 3) -> str:
        finished = sum(t.status == "finished" for t in self.trials)
        failed = sum(t.status == "error" for t in self.trials)
        lines = [
            f"## Search summary: {self.experiment_path}",
            f"{len(self.trials)} trials: {finished} finished, {self.stopped_early} stopped early by ASHA, "
            f"{failed} failed; "
            f"objective {self.objective} ({self.mode})",
            "",
            f"| rank | trial | best {self.objective} | evals | status | params | checkpoint |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, t in enumerate(self.ranked()[:top_k], 1):
            params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            tag = " (defaults)" if t.is_defaults else ""
            lines.append(
                f"| {i} | {t.trial_id}{tag} | {t.best:.4f} | {t.evaluations} | {t.status} | {params} | "
                f"{t.checkpoint or '-'} |"
            )
        best, dflt = self.best, self.defaults
        lines.append("")
        if best is not None and best is dflt:
            lines.append(f"the literature defaults (trial {best.trial_id}) are the best: {best.best:.4f}")
        elif best is not None and dflt is not None and dflt.best is not None:
            delta = float(best.best) - float(dflt.best)  # type: ignore[arg-type]
            lines.append(
                f"best trial {best.trial_id}: {self.objective} = {best.best:.4f} vs literature defaults "
                f"(trial {dflt.trial_id}, {dflt.status}): {dflt.best:.4f} ({delta:+.4f}"
                + ("; lower is better)" if self.mode == "min" else ")")
            )
        elif best is not None:
            lines.append(f"best trial {best.trial_id}: {self.objective} = {best.best:.4f}")
        lines += self._against_source_model()
        if best is not None:
            lines.append(f"best checkpoint: {best.checkpoint or '-'}")
            if best.out_dir:
                lines.append(f"best trial's run folder: {best.out_dir}")
        lines += [f"trial {t.trial_id} failed: {t.error}" for t in self.trials if t.status == "error"]
        return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# =========================================================================== storage helpers
def normalise_storage(storage: str) -> str:
    """An absolute local path, or a URI (s3://, gs://, ...) left as is."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def _is_local(storage: str) -> bool:
    return "://" not in storage or storage.startswith("file://")


def _join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def _write_text(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _read_text(uri: str) -> str | None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read()).decode()


# =========================================================================== the trial
def _trial_out_dir(setup: TrialSetup) -> Path:
    """The Trainer's run folder inside the trial's own folder.

    Local storage: ``<storage>/<name>/<trial folder>/run`` (beside Tune's result.json, persists).
    Remote storage: the trial's local working folder (Ray's session folder on its node).
    """
    import ray.tune

    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    if _is_local(setup.storage):
        root = setup.storage.removeprefix("file://")
        return Path(root) / setup.name / trial_dir.name / "run"
    return Path.cwd() / "run"


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: the base config + this trial's sampled values, trained inline or by TorchTrainer."""
    import ray.tune

    from lpcgma.distributed.train import config_from_payload
    from lpcgma.engine.trainer import NonFiniteLossError

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    sampled = {k: config[k] for k in setup.searched if k in config}
    out_dir = _trial_out_dir(setup)
    cfg = replace(
        config_from_payload(setup.base),
        {**sampled, "train.out_dir": str(out_dir), "train.resume": False, "train.progress": False},
    )
    parent = config.get("tracking_parent_run_id") or setup.parent_run_id  # a config entry wins
    tags = _trial_tags(setup.name, trial_id)
    diverged = out_dir / DIVERGED_FILE
    if diverged.is_file():  # deterministic: a retry from the last checkpoint would diverge again
        raise NonFiniteLossError(f"{diverged.read_text().strip()} (an earlier attempt of this trial; not retried)")
    try:
        _train_trial(cfg, setup, parent, tags, trial_id)
    except Exception as e:  # a Train worker group reports its worker's error wrapped in its own
        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, NonFiniteLossError) and "NonFiniteLossError" not in text:
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        line = next((x for x in text.splitlines() if "non-finite loss" in x), text)
        diverged.write_text(line.split("NonFiniteLossError: ")[-1][:500])
        raise


def _train_trial(
    cfg: ExperimentConfig, setup: TrialSetup, parent: str | None, tags: dict[str, str], trial_id: str
) -> None:
    """Train one trial's config: inline (single worker) or on a TorchTrainer worker group."""
    import ray.tune

    from lpcgma.distributed.train import fit_distributed, report_to_tune, run_inline, tracking_callbacks

    if setup.workers_per_trial == 1:
        callbacks = tracking_callbacks(cfg, parent, tags)
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            run_inline(cfg, report_to_tune, callbacks=callbacks)
        else:
            with checkpoint.as_directory() as folder:
                run_inline(cfg, report_to_tune, resume_from=folder, callbacks=callbacks)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    fit_distributed(
        cfg,
        num_workers=setup.workers_per_trial,
        cpus_per_worker=setup.cpus_per_worker,
        gpus_per_worker=setup.gpus_per_worker,
        storage_path=_join(setup.storage, setup.name, "train_runs"),
        name=f"train-{trial_id}",  # stable across trial restarts: Train V2 resumes the run by name
        max_failures=setup.max_failures,
        run_callbacks=[TuneReportCallback()],
        tracking_parent_run_id=parent,
        tracking_tags=tags,
    )


def _trial_tags(search: str, trial_id: str) -> dict[str, str]:
    try:
        from lpcgma.tracking.search import trial_tags
    except ImportError:
        return {"search": search, "ray.trial_id": trial_id}
    return trial_tags(search, trial_id)


def make_trainable(setup: TrialSetup, plan: ResourcePlan) -> Any:
    """The Tune trainable: `run_trial` bound to `setup`, with the trial's resource request."""
    from ray import tune

    def lpcgma_trial(config: dict[str, Any]) -> None:
        run_trial(config, setup)

    return tune.with_resources(lpcgma_trial, plan.trial_resources)


# =========================================================================== the search
def default_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.method.name}_{cfg.data.dataset}_{time.strftime('%Y%m%d-%H%M%S')}"


def evaluations_per_trial(cfg: ExperimentConfig) -> int:
    """Reports a full trial makes (ASHA's max_t): one per evaluation, the last at train.iters."""
    return cfg.train.evaluations()


def resolve_objective(objective: str, mode: str | None = None) -> tuple[str, str]:
    """(metric key, mode) of ``--objective``/``--mode``: a criterion name (``snd``) or a metric key,
    the mode from `lpcgma.engine.label_free.CRITERIA` unless `mode` is given (max for unknown keys)."""
    from lpcgma.engine import label_free

    if mode and mode not in ("max", "min"):
        raise ConfigError(f"--mode must be max or min, got {mode!r}")
    try:
        return label_free.resolve_objective(objective, mode or None)
    except ValueError as e:
        raise ConfigError(f"--objective: {e}") from e


def resolve_base(settings: SearchSettings) -> ExperimentConfig:
    """The base config: file + smoke overrides (if any) + user overrides; the tracking URI resolved.

    When the objective is a criterion, each trial's checkpoints/best is selected by it too
    (``train.select_by``), so the checkpoint Tune and MLflow keep is the objective's best. The
    objective must be reported under this config (e.g. no target_miou without target labels).
    """
    from lpcgma.engine.label_free import find_criterion
    from lpcgma.engine.trainer import check_reported

    overrides = list(SMOKE_OVERRIDES if settings.smoke_test else ()) + list(settings.overrides)
    cfg = load_config(resolve_config_path(settings.config), overrides)
    if cfg.tracking.enabled and not cfg.tracking.tracking_uri:
        from lpcgma.tracking.store import resolve_tracking_uri

        # Resolved once, on the driver ($MLFLOW_TRACKING_URI, else the driver's local store): every
        # trial then writes where the search's parent run is, whatever checkout Ray imports on a worker.
        cfg = replace(cfg, {"tracking.tracking_uri": resolve_tracking_uri(cfg.tracking)})
    criterion = find_criterion(settings.objective)
    if criterion is not None and find_criterion(cfg.train.select_by) != criterion:
        cfg = replace(cfg, {"train.select_by": criterion.metric})
    check_reported(cfg, criterion.metric if criterion else settings.objective, "--objective")
    return cfg


def check_data(cfg: ExperimentConfig, remote_cluster: bool = False) -> None:
    """Build the datasets once before Ray starts, so that a missing or broken dataset is one clear
    error here instead of a failure in every trial. On a remote cluster a local path that this
    machine lacks may exist on the workers: it is left to them (with a note)."""
    from lpcgma.data.build import build_datasets

    d = cfg.data
    if remote_cluster and d.dataset != "synthetic" and d.root and "://" not in d.root and not Path(d.root).exists():
        print(f"note: data.root '{d.root}' is not on this machine; the trials will look for it on their nodes")
        return
    build_datasets(d)  # ConfigError / DatasetNotFoundError / DataError naming the key or file


def _saved_search(settings: SearchSettings, storage: str) -> dict[str, Any] | None:
    text = _read_text(_join(storage, settings.name, SEARCH_FILE))
    return json.loads(text) if text else None


def _init_ray(settings: SearchSettings) -> bool:
    """Connect to `settings.address` or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.address:
        ray.init(address=settings.address, log_to_driver=True)
        return True
    cpus = settings.num_cpus or os.cpu_count() or 1
    kwargs: dict[str, Any] = {
        "num_cpus": cpus,
        "resources": {DRIVER_RESOURCE: float(cpus)},
    }
    if settings.num_gpus is not None:
        kwargs["num_gpus"] = settings.num_gpus
    temp = settings.ray_temp_dir or os.environ.get("RAY_TMPDIR")
    if temp:
        kwargs["_temp_dir"] = str(Path(temp).resolve())
    ray.init(**kwargs)
    return True


def planning_nodes(local: bool) -> list[NodeShape]:
    """Alive nodes, plus the nodes the autoscaler may add when this is a launcher-started head."""
    nodes = cluster_nodes()
    return nodes if local else nodes + autoscaler_nodes()


def run_search(
    settings: SearchSettings,
    on_search_start: Callable[[SearchInfo], str | None] | None = None,
    on_search_end: Callable[[SearchInfo, SearchOutcome], None] | None = None,
) -> SearchOutcome:
    """Run (or resume) a search and print the summary; returns the outcome.

    Everything that can be checked is checked before Ray starts: the base config, the search space
    (keys, types, bounds), the defaults point and, once connected, the resource plan.
    """
    settings = dataclasses.replace(settings, overrides=list(settings.overrides))  # the caller's stays as is
    settings.objective, settings.mode = resolve_objective(settings.objective, settings.mode)
    if settings.address is None and (os.environ.get("RAY_ADDRESS") or BOOTSTRAP_CONFIG.expanduser().is_file()):
        settings.address = "auto"  # on a cluster's head (ray up / ray submit): join it, don't start another
    storage = normalise_storage(settings.storage)
    if settings.resume:
        if not settings.name:
            raise ConfigError("--resume needs --name: the search to resume under --storage")
        saved = _saved_search(settings, storage)
        if saved is None:
            raise ConfigError(f"no search '{settings.name}' to resume under '{storage}' ({SEARCH_FILE} missing)")
        kept = {k: v for k, v in saved["settings"].items() if k in {f.name for f in fields(SearchSettings)}}
        runtime = {
            "resume",
            "address",
            "num_cpus",
            "num_gpus",
            "ray_temp_dir",
            "verbose",
            "top_k",
            "parent_run_id",
        }
        for k in runtime:
            kept[k] = getattr(settings, k)
        settings = SearchSettings(**kept)
        base = load_config(None, dict(saved["base"]))
        space = parse_search_space(saved["space"], saved["space_path"], base=base)
    else:
        from lpcgma.engine.source_stage import check_searchable

        base = with_search_store(resolve_base(settings), storage)
        space = load_search_space(settings.search_space, base=base)
        check_searchable(base, space.keys)
        check_data(base, remote_cluster=settings.address is not None)
        if settings.smoke_test:
            settings.num_samples = min(settings.num_samples, SMOKE_MAX_SAMPLES)
        if not settings.name:
            settings.name = default_name(base)
        if _saved_search(settings, storage) is not None:
            raise ConfigError(
                f"a search named '{settings.name}' already exists under '{storage}': "
                "pass --resume to continue it, or another --name"
            )
    if settings.mode not in ("max", "min"):
        raise ConfigError(f"--mode must be max or min, got {settings.mode!r}")
    if settings.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {settings.num_samples}")
    defaults = defaults_point(space, base)
    max_t = evaluations_per_trial(base)
    if settings.grace_period > max_t:
        raise ConfigError(f"ASHA grace period {settings.grace_period} exceeds the {max_t} evaluations of a trial")
    # Fail fast on resources that can never fit a trial, before Ray starts: GPUs asked for, none here.
    if settings.address is None and settings.gpus_per_worker > 0:
        import torch

        have = settings.num_gpus if settings.num_gpus is not None else torch.cuda.device_count()
        plan_resources(
            [NodeShape(float(settings.num_cpus or os.cpu_count() or 1), float(have), 1.0, "local")],
            settings.workers_per_trial,
            settings.cpus_per_worker,
            settings.gpus_per_worker,
        )

    from ray import tune

    from lpcgma.distributed.train import config_to_payload

    started = _init_ray(settings)
    try:
        nodes = planning_nodes(local=settings.address is None)
        plan = plan_resources(
            nodes,
            settings.workers_per_trial,
            settings.cpus_per_worker,
            settings.gpus_per_worker,
            settings.max_concurrent,
        )
        print(plan.describe(), flush=True)
        storage_warning = local_storage_warning(storage, nodes)
        if storage_warning:
            print(storage_warning, file=sys.stderr, flush=True)
        experiment_path = _join(storage, settings.name)
        info = SearchInfo(settings.name, storage, experiment_path, base, space, defaults, settings)
        parent = settings.parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        if on_search_start is not None:
            parent = on_search_start(info) or parent
        info.parent_run_id = parent
        source_model = obtain_source_model(base, settings.cpus_per_worker, settings.gpus_per_worker, parent)
        setup = TrialSetup(
            base=config_to_payload(base),
            searched=tuple(space.keys),
            workers_per_trial=settings.workers_per_trial,
            cpus_per_worker=settings.cpus_per_worker,
            gpus_per_worker=settings.gpus_per_worker,
            max_failures=settings.max_failures,
            storage=storage,
            name=settings.name,
            parent_run_id=parent,
        )
        trainable = make_trainable(setup, plan)
        if settings.resume:
            if not tune.Tuner.can_restore(experiment_path):
                raise ConfigError(f"no restorable Tune experiment at '{experiment_path}'")
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
        else:
            _write_text(
                _join(experiment_path, SEARCH_FILE),
                json.dumps(
                    {
                        "settings": asdict(settings),
                        "base": config_to_payload(base),
                        "space": _space_mapping(space),
                        "space_path": space.path,
                        "defaults": defaults,
                    },
                    indent=2,
                    default=str,
                ),
            )
            tuner = _build_tuner(settings, trainable, space, defaults, plan, max_t, storage)
        sigint_before = signal.getsignal(signal.SIGINT)
        with credentials_out_of_env():  # Tune would copy AWS keys into each trial's runtime_env (and Ray's logs)
            results = tuner.fit()
        outcome = summarize(results, settings.objective, settings.mode, defaults, experiment_path, max_t)
        outcome.source_model = source_model
        outcome.complete = (
            not _tune_was_interrupted(sigint_before)
            and results.num_terminated + results.num_errors >= settings.num_samples
        )
        print(outcome.format(settings.top_k), flush=True)
        if not outcome.complete:  # interrupted (Ctrl-C): the parent run stays open for --resume
            storage_arg = settings.storage if "://" in settings.storage else storage
            print(
                f"search interrupted: resume it with  lpcgma tune --resume --storage {storage_arg} "
                f"--name {settings.name}",
                flush=True,
            )
        elif on_search_end is not None:
            on_search_end(info, outcome)
        return outcome
    finally:
        if started:
            import ray

            ray.shutdown()


def _tune_was_interrupted(sigint_before: Any) -> bool:
    """Whether Ctrl-C (SIGINT) stopped `tuner.fit()`.

    Ray Tune does not expose this: on a run's first SIGINT its handler puts the previous handler
    back, and after a normal run its own handler stays installed. Counting finished trials is not
    enough — Tune marks the trial it interrupted TERMINATED too.
    """
    if threading.current_thread() is not threading.main_thread() or os.getenv("TUNE_DISABLE_SIGINT_HANDLER") == "1":
        return False  # Tune installed no handler: nothing to tell by
    return signal.getsignal(signal.SIGINT) is sigint_before


def _space_mapping(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in space.params:
        entry: dict[str, Any] = {"type": p.type, "comment": p.comment}
        if p.type == "choice":
            entry["values"] = list(p.values)
        else:
            entry["low"], entry["high"] = p.low, p.high
        out[p.key] = entry
    return out


def _make_protected_asha() -> type:
    """ASHA that never stops the literature-defaults trial early (`DefaultsProtectedASHA`).

    The defaults trial still enters every rung (its results set the cut-offs for the others), but it
    always runs to the end, so the summary compares the best trial with the defaults at full length.
    Built on first use so that importing this module does not import Ray; reachable as
    ``lpcgma.distributed.tune.DefaultsProtectedASHA`` (module ``__getattr__``), which is what a
    restored experiment unpickles.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class DefaultsProtectedASHA(ASHAScheduler):  # type: ignore[misc]
        def __init__(self, *args: Any, protected: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.protected = dict(protected or {})

        def _is_protected(self, trial: Any) -> bool:
            config = trial.config or {}
            return bool(self.protected) and all(k in config and _close(config[k], v) for k, v in self.protected.items())

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            action: str = super().on_trial_result(tune_controller, trial, result)
            unfinished = result.get(self._time_attr, 0) < self._max_t
            if action == TrialScheduler.STOP and unfinished and self._is_protected(trial):
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    DefaultsProtectedASHA.__module__ = __name__
    DefaultsProtectedASHA.__qualname__ = "DefaultsProtectedASHA"
    return DefaultsProtectedASHA


def __getattr__(name: str) -> Any:
    if name == "DefaultsProtectedASHA":
        cls = _make_protected_asha()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_tuner(
    settings: SearchSettings,
    trainable: Any,
    space: SearchSpace,
    defaults: dict[str, Any],
    plan: ResourcePlan,
    max_t: int,
    storage: str,
) -> Any:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    n_startup = settings.n_startup_trials
    if n_startup is None:
        n_startup = min(10, max(3, settings.num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=n_startup, constant_liar=True)
    searcher = OptunaSearch(
        metric=settings.objective, mode=settings.mode, points_to_evaluate=[defaults], sampler=sampler
    )
    scheduler = __getattr__("DefaultsProtectedASHA")(
        protected=defaults,
        time_attr="training_iteration",
        metric=settings.objective,
        mode=settings.mode,
        max_t=max_t,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=plan.max_concurrent,
            reuse_actors=plan.inline,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=settings.objective,
                checkpoint_score_order=settings.mode,
            ),
            verbose=settings.verbose,
        ),
    )


# =========================================================================== the summary
def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def summarize(
    results: Any, objective: str, mode: str, defaults: Mapping[str, Any], experiment_path: str, max_t: int
) -> SearchOutcome:
    """One `TrialSummary` per trial of a ResultGrid: best objective, status, params, checkpoint."""
    trials: list[TrialSummary] = []
    for result in results:
        config = dict(result.config or {})
        params = {k: config[k] for k in defaults if k in config}
        df = result.metrics_dataframe
        best: float | None = None
        checkpoint: str | None = None
        evaluations = 0
        if df is not None and objective in df and df[objective].notna().any():
            col = df[objective]
            idx = col.idxmax() if mode == "max" else col.idxmin()
            best = float(col[idx])
            evaluations = int(df["training_iteration"].max()) if "training_iteration" in df else len(df)
            if "checkpoint_path" in df:  # multi-worker trials: TuneReportCallback's checkpoint paths
                with_ckpt = df[df["checkpoint_path"].notna()]
                if len(with_ckpt):
                    sub = with_ckpt[objective]
                    checkpoint = str(with_ckpt.loc[sub.idxmax() if mode == "max" else sub.idxmin(), "checkpoint_path"])
        if checkpoint is None:
            try:
                ck = result.get_best_checkpoint(objective, mode) if result.best_checkpoints else result.checkpoint
            except Exception:  # noqa: BLE001 - a trial without the metric in its checkpoints
                ck = result.checkpoint
            checkpoint = ck.path if ck is not None else None
        if result.error is not None:
            status = "error"
        elif evaluations < max_t:
            status = "stopped early"
        else:
            status = "finished"
        scheme = experiment_path.split("://", 1)[0] + "://" if "://" in experiment_path else ""
        if checkpoint and scheme and not checkpoint.startswith(scheme):
            checkpoint = scheme + checkpoint  # remote storage: pyarrow paths come without the scheme
        out_dir = None
        if result.path and "://" not in str(experiment_path):
            run = Path(result.path) / "run"
            out_dir = str(run) if run.exists() else None
        trial_id = str((result.metrics or {}).get("trial_id") or Path(str(result.path)).name)
        is_defaults = (
            bool(params) and len(params) == len(defaults) and all(_close(params[k], defaults[k]) for k in defaults)
        )
        error = _error_line(result.error) if result.error is not None else None
        trials.append(
            TrialSummary(trial_id, status, best, evaluations, params, checkpoint, out_dir, is_defaults, error)
        )
    return SearchOutcome(experiment_path, objective, mode, trials, results)


def _error_line(error: BaseException) -> str:
    """The root cause of a trial's error, one line: Ray wraps the trial's exception in its own."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# =========================================================================== arguments
def add_search_arguments(
    parser: argparse.ArgumentParser,
    config: str = "synthetic",
    search_space: str = "smoke",
    num_samples: int = 8,
) -> None:
    """The options `lpcgma tune` and the experiments/ scripts share."""
    p = parser
    p.add_argument("--config", default=config, help=f"base config: YAML file or packaged name (default: {config})")
    p.add_argument(
        "--search-space",
        default=search_space,
        help=f"search space: YAML file or packaged name in lpcgma/search_spaces (default: {search_space})",
    )
    p.add_argument("--num-samples", type=int, default=num_samples, help="number of trials")
    p.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="Ray Train workers per trial (1: the trainer runs inline in the trial, no worker group)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument(
        "--objective",
        default="target_miou",
        help="what to optimise: a model-selection criterion (target_miou, source_miou, snd, snd_embed, entropy, "
        "im, agreement, flip_agreement: lpcgma.engine.label_free.CRITERIA, which sets the mode) or any reported "
        "metric key (default: target_miou)",
    )
    p.add_argument(
        "--mode", choices=["max", "min"], default=None, help="override the objective's mode (default: its own)"
    )
    p.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV, "runs/tune"),
        help=f"local folder or s3://bucket/prefix (default: ${STORAGE_ENV}, else runs/tune)",
    )
    p.add_argument("--name", default="", help="experiment name (default: <method>_<dataset>_<time>)")
    p.add_argument("--resume", action="store_true", help="resume the search --name under --storage")
    p.add_argument(
        "--address",
        default=None,
        help="existing Ray cluster ('auto' or HOST:PORT); default: start Ray on this machine",
    )
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations before a trial may be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA halving rate")
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial from its last checkpoint")
    p.add_argument("--n-startup-trials", type=int, default=None, help="TPE random start-up trials")
    p.add_argument("--parent-run-id", default=None, help=f"MLflow parent run of the trials (or ${PARENT_RUN_ENV})")
    p.add_argument("--num-cpus", type=int, default=None, help="local cluster: CPUs for Ray (default: all)")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny trials (a few steps, small model), at most {SMOKE_MAX_SAMPLES}",
    )
    p.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the base config (repeatable), e.g. --set method.name=lpcgma",
    )


def settings_from_args(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> SearchSettings:
    """SearchSettings from `add_search_arguments` options (+ positional overrides, if any)."""
    overrides = [*extra_overrides, *args.set_overrides, *getattr(args, "overrides", [])]
    objective, mode = resolve_objective(args.objective, args.mode)  # e.g. snd → target_snd, max
    return SearchSettings(
        config=args.config,
        search_space=args.search_space,
        overrides=overrides,
        num_samples=args.num_samples,
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        objective=objective,
        mode=mode,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        address=args.address,
        max_concurrent=args.max_concurrent,
        seed=args.seed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_failures=args.max_failures,
        n_startup_trials=args.n_startup_trials,
        parent_run_id=args.parent_run_id,
        num_cpus=args.num_cpus,
        smoke_test=args.smoke_test,
    )


def mlflow_hooks() -> tuple[Callable[[SearchInfo], str | None], Callable[[SearchInfo, SearchOutcome], None]]:
    """`run_search` hooks that keep a parent MLflow run per search (lpcgma.tracking.search).

    Start: the parent run (continued on --resume), the search space as params. End: ends the runs
    of trials ASHA stopped or that failed, logs the trials table and Optuna plots, ends the parent.
    Both are no-ops when tracking is off or the tracking package is absent; they never raise.
    """

    def start(info: SearchInfo) -> str | None:
        try:
            from lpcgma.tracking.search import on_search_start
        except ImportError:
            return None
        return on_search_start(
            info.base_config,
            info.name,
            space=_space_mapping(info.space),
            tags={"ray.experiment_path": info.experiment_path},
            resume=info.settings.resume,
        )

    def end(info: SearchInfo, outcome: SearchOutcome) -> None:
        try:
            from lpcgma.tracking.search import on_search_end
        except ImportError:
            return
        succeeded = any(t.status != "error" and t.best is not None for t in outcome.trials)
        summary = on_search_end(
            info.base_config,
            info.parent_run_id,
            results=outcome.results,
            metric=outcome.objective,
            mode=outcome.mode,
            space_keys=info.space.keys,
            status="FINISHED" if succeeded else "FAILED",  # no trial succeeded: the search failed
        )
        try:
            print(mlflow_closing_lines(info, summary), flush=True)
        except Exception as e:  # the search is done; never fail it for a message
            print(f"MLflow: could not summarise the search's runs ({e})", flush=True)

    return start, end


def mlflow_closing_lines(info: SearchInfo, summary: Any) -> str:
    """Where to look at the search in MLflow: the UI command and the best trial's run."""
    from lpcgma.tracking.store import resolve_tracking_uri, run_url, ui_command

    uri = resolve_tracking_uri(info.base_config.tracking)
    lines = [f"MLflow: {ui_command(uri)}"]
    if info.parent_run_id:
        lines.append(f"  search run:  {info.parent_run_id}")
    if summary is not None and summary.best_run_id:
        import mlflow

        exp_id = mlflow.MlflowClient(uri).get_run(summary.best_run_id).info.experiment_id
        lines.append(
            f"  best run:    {summary.best_run_id} ({summary.metric} = {summary.best_value:.4f})  "
            f"{run_url(uri, exp_id, summary.best_run_id)}"
        )
        mode = " --mode min" if getattr(summary, "mode", "max") == "min" else ""
        lines.append(f"  promote it:  lpcgma promote --search {info.name} --metric {summary.metric}{mode}")
    return "\n".join(lines)


def promote_best(
    search_name: str, metric: str = "target_miou", mode: str = "max", model_name: str | None = None
) -> bool:
    """Register the best trial as the champion (``lpcgma.tracking.registry.promote``), if available."""
    try:
        registry = importlib.import_module("lpcgma.tracking.registry")
    except ImportError as e:
        print(f"promotion is unavailable: lpcgma.tracking.registry cannot be imported ({e})", file=sys.stderr)
        return False
    try:
        result = registry.promote(search_name, metric=metric, mode=mode, model_name=model_name)
    except (registry.PromotionRefused, registry.PromotionError, ValueError) as e:
        print(f"not promoted: {e}", file=sys.stderr)
        return False
    print(f"promoted: {getattr(result, 'model_uri', result)}")
    return True


def is_shards_root(root: str) -> bool:
    """Whether `root` holds `lpcgma data pack` shards: any s3:// URI, or a folder with their manifest."""
    from lpcgma.data.shards import MANIFEST_FILE

    return root.startswith("s3://") or (Path(root) / MANIFEST_FILE).is_file()


def experiment_main(
    argv: Sequence[str] | None,
    description: str | None,
    config: str,
    search_space: str,
    num_samples: int,
    data_root_env: str | None = None,
    data_root_help: str = "",
    extra_overrides: Sequence[str] = (),
    smoke_free_overrides: Sequence[str] = (),
) -> int:
    """The body of every `experiments/tune_*.py` script: parse → search → optionally promote.

    `data_root_env` adds ``--data-root`` (default: that environment variable) → ``data.root``;
    `smoke_free_overrides` apply only without ``--smoke-test`` (e.g. the demo's trial sizes).
    Exit code 0 when the search completed with a best trial.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(parser, config=config, search_space=search_space, num_samples=num_samples)
    if data_root_env:
        parser.add_argument(
            "--data-root", default=os.environ.get(data_root_env), help=f"{data_root_help} (default: ${data_root_env})"
        )
    parser.add_argument("--promote", action="store_true", help="register the best trial as the champion model")
    parser.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. train.iters=20000")
    args = parser.parse_args(argv)
    extra = [*extra_overrides, *(() if args.smoke_test else smoke_free_overrides)]
    if getattr(args, "data_root", None):
        extra.append(f"data.root={args.data_root}")
        if is_shards_root(args.data_root):  # packed by `lpcgma data pack`: stream the shards
            extra.append("data.dataset=shards")
    try:
        settings = settings_from_args(args, extra_overrides=extra)
        outcome = run_search(settings, *mlflow_hooks())
    except (ConfigError, ValueError, FileNotFoundError) as e:  # SearchSpaceError, ResourceError, DataError
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    if args.promote and outcome.complete:
        promote_best(settings.name, settings.objective, settings.mode)
    return 0 if outcome.complete and outcome.best is not None else 1


__all__ = [
    "DRIVER_RESOURCE",
    "NodeShape",
    "ResourceError",
    "ResourcePlan",
    "SearchInfo",
    "SearchOutcome",
    "SearchSettings",
    "TrialSetup",
    "TrialSummary",
    "add_search_arguments",
    "experiment_main",
    "autoscaler_nodes",
    "cluster_nodes",
    "evaluations_per_trial",
    "make_trainable",
    "mlflow_hooks",
    "plan_resources",
    "promote_best",
    "resolve_base",
    "resolve_objective",
    "run_search",
    "run_trial",
    "settings_from_args",
    "summarize",
]
