"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over the complete adaptation trainer.

One search = one Tuner (`lpcgma.distributed.tuner`). Each trial is a plain function
(`lpcgma.distributed.trial`, the "driver", Ray 2.60 Train V2 style):

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
worker shape (`lpcgma.distributed.resources`), and a search that cannot fit even one trial is
refused before it starts.

The search writes ``lpcgma_search.json`` (the resolved base config, search space and settings) into
its experiment folder, so ``--resume`` needs only ``--storage`` and ``--name``: ``Tuner.restore``
keeps finished trials and the searcher's history and reruns only what was unfinished; the settings
of this invocation (`SearchSettings` fields declared ``runtime``) replace the saved ones.

MLflow hooks: `run_search` takes ``on_search_start(info) -> parent run id | None`` and
``on_search_end(info, outcome)`` (`lpcgma.distributed.search_cli.mlflow_hooks` gives the ones of
``lpcgma.tracking.search``). The parent run id (from the hook, ``--parent-run-id`` or
``$LPCGMA_PARENT_RUN_ID``) reaches every trial, whose MLflow run becomes its child. ASHA-stopped
trials never run code after their last report, so ending their MLflow runs is ``on_search_end``'s
job; an interrupted search skips it and leaves the parent run open for ``--resume``.

The literature-defaults trial is never stopped early (`DefaultsProtectedASHA`), so the summary
compares the best trial with the defaults at full length. On the head of a ``ray up`` cluster (or
with ``$RAY_ADDRESS``) a search joins the running cluster even without ``--address``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lpcgma.config import ConfigError, ExperimentConfig, load_config, replace, resolve_config_path
from lpcgma.distributed.credentials import credentials_out_of_env
from lpcgma.distributed.resources import (
    BOOTSTRAP_CONFIG,
    DRIVER_RESOURCE,
    NodeShape,
    ResourcePlan,
    local_storage_warning,
    plan_resources,
    planning_nodes,
)
from lpcgma.distributed.search_summary import summarize
from lpcgma.distributed.search_types import (
    PARENT_RUN_ENV,
    SMOKE_MAX_SAMPLES,
    SMOKE_OVERRIDES,
    SearchInfo,
    SearchOutcome,
    SearchSettings,
    TrialSetup,
)
from lpcgma.distributed.source_model import obtain_source_model, with_search_store
from lpcgma.distributed.trial import make_trainable
from lpcgma.distributed.tuner import build_tuner, restore_tuner
from lpcgma.engine.checkpoint import drop_step_checkpoints
from lpcgma.search_space import (
    SearchSpace,
    defaults_point,
    load_search_space,
    parse_search_space,
    space_mapping,
)
from lpcgma.storage import join_uri, normalise_storage, read_text, write_text

SEARCH_FILE = "lpcgma_search.json"
SearchStart = Callable[[SearchInfo], str | None]
SearchEnd = Callable[[SearchInfo, SearchOutcome], None]


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


def init_ray(settings: SearchSettings) -> bool:
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


def _tune_was_interrupted(sigint_before: Any) -> bool:
    """Whether Ctrl-C (SIGINT) stopped `tuner.fit()`.

    Ray Tune does not expose this: on a run's first SIGINT its handler puts the previous handler
    back, and after a normal run its own handler stays installed. Counting finished trials is not
    enough — Tune marks the trial it interrupted TERMINATED too.
    """
    if threading.current_thread() is not threading.main_thread() or os.getenv("TUNE_DISABLE_SIGINT_HANDLER") == "1":
        return False  # Tune installed no handler: nothing to tell by
    return signal.getsignal(signal.SIGINT) is sigint_before


def run_search(
    settings: SearchSettings,
    on_search_start: SearchStart | None = None,
    on_search_end: SearchEnd | None = None,
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
        settings, base, space = _saved_search_to_resume(settings, storage)
    else:
        base, space = _new_search(settings, storage)
    defaults, max_t = _check_search(settings, base, space)
    started = init_ray(settings)
    try:
        return _search_on_ray(settings, storage, base, space, defaults, max_t, on_search_start, on_search_end)
    finally:
        if started:
            import ray

            ray.shutdown()


def _saved_search(settings: SearchSettings, storage: str) -> dict[str, Any] | None:
    text = read_text(join_uri(storage, settings.name, SEARCH_FILE))
    return json.loads(text) if text else None


def _saved_search_to_resume(
    settings: SearchSettings, storage: str
) -> tuple[SearchSettings, ExperimentConfig, SearchSpace]:
    """The saved search `settings.name` under `storage`: its settings (with this invocation's runtime
    settings), base config and search space."""
    if not settings.name:
        raise ConfigError("--resume needs --name: the search to resume under --storage")
    saved = _saved_search(settings, storage)
    if saved is None:
        raise ConfigError(f"no search '{settings.name}' to resume under '{storage}' ({SEARCH_FILE} missing)")
    base = load_config(None, dict(saved["base"]))
    space = parse_search_space(saved["space"], saved["space_path"], base=base)
    return settings.resumed(saved["settings"]), base, space


def _new_search(settings: SearchSettings, storage: str) -> tuple[ExperimentConfig, SearchSpace]:
    """A new search's base config and search space, checked; names the search when unnamed (in place)."""
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
    return base, space


def _check_search(settings: SearchSettings, base: ExperimentConfig, space: SearchSpace) -> tuple[dict[str, Any], int]:
    """(defaults point, evaluations of a full trial), once the settings are checked; before Ray starts."""
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
    return defaults, max_t


def _plan(settings: SearchSettings, storage: str) -> ResourcePlan:
    """The resource plan on the connected cluster, printed (with a warning for node-local storage)."""
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
    return plan


def _search_on_ray(
    settings: SearchSettings,
    storage: str,
    base: ExperimentConfig,
    space: SearchSpace,
    defaults: dict[str, Any],
    max_t: int,
    on_search_start: SearchStart | None,
    on_search_end: SearchEnd | None,
) -> SearchOutcome:
    """The search on the connected Ray: plan, parent run, source model, Tuner, fit, summary, end hook."""
    from lpcgma.distributed.train import config_to_payload

    plan = _plan(settings, storage)
    experiment_path = join_uri(storage, settings.name)
    info = SearchInfo(settings.name, storage, experiment_path, base, space, defaults, settings)
    parent = settings.parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    if on_search_start is not None:
        parent = on_search_start(info) or parent
    info.parent_run_id = parent
    source_model = obtain_source_model(base, plan.source_stage_cpus, settings.gpus_per_worker, parent)
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
        tuner = restore_tuner(experiment_path, trainable)
    else:
        _save_search(experiment_path, settings, base, space, defaults)
        tuner = build_tuner(settings, trainable, space, defaults, plan, max_t, storage)
    outcome = _fit(tuner, settings, defaults, experiment_path, max_t)
    outcome.source_model = source_model
    print(outcome.format(settings.top_k), flush=True)
    if not outcome.complete:  # interrupted (Ctrl-C): the parent run stays open for --resume
        storage_arg = settings.storage if "://" in settings.storage else storage
        print(
            f"search interrupted: resume it with  lpcgma tune --resume --storage {storage_arg} --name {settings.name}",
            flush=True,
        )
    elif on_search_end is not None:
        on_search_end(info, outcome)
    return outcome


def _save_search(
    experiment_path: str,
    settings: SearchSettings,
    base: ExperimentConfig,
    space: SearchSpace,
    defaults: dict[str, Any],
) -> None:
    """Write `SEARCH_FILE`: what ``--resume`` reads back (settings, resolved base config, search space)."""
    from lpcgma.distributed.train import config_to_payload

    saved = {
        "settings": asdict(settings),
        "base": config_to_payload(base),
        "space": space_mapping(space),
        "space_path": space.path,
        "defaults": defaults,
    }
    write_text(join_uri(experiment_path, SEARCH_FILE), json.dumps(saved, indent=2, default=str))


def _fit(
    tuner: Any, settings: SearchSettings, defaults: dict[str, Any], experiment_path: str, max_t: int
) -> SearchOutcome:
    """Run `tuner` and summarise its trials; ``complete`` is False when Ctrl-C stopped it early."""
    sigint_before = signal.getsignal(signal.SIGINT)
    with credentials_out_of_env():  # Tune would copy AWS keys into each trial's runtime_env (and Ray's logs)
        results = tuner.fit()
    outcome = summarize(results, settings.objective, settings.mode, defaults, experiment_path, max_t)
    for trial in outcome.trials:  # a trial's resumable checkpoints are Ray's (`report_to_tune`): drop the
        if trial.out_dir:  # run-folder copies a trial stopped inside its last report had no time to delete
            drop_step_checkpoints(Path(trial.out_dir) / "checkpoints")
    outcome.complete = (
        not _tune_was_interrupted(sigint_before) and results.num_terminated + results.num_errors >= settings.num_samples
    )
    return outcome
