"""MLflow at the search level: one parent run per search, a summary at the end, no trial left RUNNING.

The Tune driver (``lpcgma.distributed``) calls two hooks; the trials log themselves from rank 0 of
their training through `MLflowCallback(cfg, parent_run_id=..., tags=trial_tags(name, trial_id))`:

- `on_search_start(cfg, search_name, space=...)` → the parent run's id (params ``space.<key>``
  describe the search space; tags ``lpcgma.role=search``, ``search``, method, dataset, domains,
  eval split, git commit; artifacts ``search_space.yaml`` and ``base_config.yaml``). With
  ``resume=True`` (``lpcgma tune --resume``) the latest parent run of that search is continued.
- `on_search_end(cfg, parent_run_id, results=...)`: ends the runs of trials that could not end
  themselves (stopped by ASHA → KILLED, errored → FAILED with the reason in the tag ``error``), logs
  the summary — ``summary/trials.parquet`` and ``summary/trials.csv`` (one row per trial: ids,
  status, best metric, params), Optuna's ``summary/param_importances.png`` and
  ``summary/optimization_history.png``, the metric ``best_<metric>`` and the tags
  ``best_trial_id`` / ``best_run_id`` — and ends the parent run.

The hooks never raise: a tracking problem is logged as a warning and the search result stands.
The trials table is built from MLflow (the trial runs are the record), joined with Ray's result
dataframe when one is passed.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lpcgma.config import ExperimentConfig, dump_config
from lpcgma.engine.label_free import best_of
from lpcgma.tracking.offline import RunLogger, retry
from lpcgma.tracking.redaction import redact_mapping, redact_tree, redact_yaml_text
from lpcgma.tracking.runs import (
    ERROR_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    SOURCE_MODEL_TAG,
    TRIAL_TAG,
    run_tags,
)
from lpcgma.tracking.store import all_runs, best_over_history, resolve_tracking_uri, tracking_client

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"
_TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")  # <trainable>_<trial id>_<index>_<params>
_RAY_TO_MLFLOW = {
    "ERROR": "FAILED",
    "TERMINATED": "KILLED",
    "RUNNING": "KILLED",
    "PENDING": "KILLED",
    "PAUSED": "KILLED",
    "FAILED": "FAILED",
    "KILLED": "KILLED",
    "FINISHED": "FINISHED",
}


def trial_tags(search_name: str, trial_id: str) -> dict[str, str]:
    """The tags a trial's `MLflowCallback` gets (``search`` and ``ray.trial_id``)."""
    return {SEARCH_TAG: search_name, TRIAL_TAG: str(trial_id)}


def default_record_dir(cfg: ExperimentConfig, search_name: str) -> Path:
    """Where the parent run's offline record goes when the server is down (beside the trial folders)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in search_name)
    return Path(cfg.train.out_dir) / f"mlflow_search_{safe}"


def _describe(spec: Any) -> str:
    if isinstance(spec, Mapping):
        kind = spec.get("type") or spec.get("distribution") or ""
        rest = {k: v for k, v in spec.items() if k not in ("type", "distribution", "comment")}
        return f"{kind}({', '.join(f'{k}={v}' for k, v in rest.items())})" if kind else str(rest)
    return str(spec)


# ------------------------------------------------------------------------------------ parent run
def find_search_runs(client: Any, search_name: str, role: str = "search") -> list[Any]:
    """Runs tagged with search `search_name` and role `role` in any experiment, newest first."""
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exps:
        return []
    quoted = search_name.replace("'", "\\'")
    return all_runs(
        client,
        exps,
        f"tags.`{ROLE_TAG}` = '{role}' and tags.{SEARCH_TAG} = '{quoted}'",
        order_by=["attributes.start_time DESC"],
    )


def start_search_run(
    cfg: ExperimentConfig,
    search_name: str,
    space: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    record_dir: str | Path | None = None,
) -> str | None:
    """Start (or with `resume`, continue) the parent run of a search; its id, or None if MLflow is down."""
    uri = resolve_tracking_uri(cfg.tracking, tracking_uri)
    client = tracking_client(uri)
    existing = None
    if resume:
        try:
            found = retry(find_search_runs, client, search_name)
            existing = found[0].info.run_id if found else None
        except Exception as e:
            log.warning("could not look up search %r in MLflow: %s", search_name, e)
    all_tags = {**run_tags(cfg), ROLE_TAG: "search", SEARCH_TAG: search_name, **dict(tags or {})}
    all_tags, _ = redact_mapping(all_tags)
    logger = RunLogger(uri, Path(record_dir) if record_dir else default_record_dir(cfg, search_name))
    run_id = logger.start_run(cfg.tracking.experiment, search_name, all_tags, run_id=existing)
    if logger.offline:
        log.warning("MLflow is unreachable: search %r runs without a parent run (trials still log)", search_name)
        return None
    if existing is None:
        if space:
            params, _ = redact_mapping({f"space.{k}": _describe(v) for k, v in space.items()})
            logger.log_params(params)
            logger.log_text(yaml.safe_dump(redact_tree(dict(space)), sort_keys=False), "search_space.yaml")
        logger.log_text(redact_yaml_text(dump_config(cfg)), "base_config.yaml")
    return run_id


def source_model_run(client: Any, key: str) -> str | None:
    """The newest finished MLflow run of the source stage with key `key` (any experiment), if any."""
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exps:
        return None
    query = f"tags.`{ROLE_TAG}` = 'source_model' and tags.`{SOURCE_MODEL_TAG}` = '{key}'"
    found = all_runs(client, exps, f"{query} and attributes.status = 'FINISHED'", ["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def link_source_model(cfg: ExperimentConfig, parent_run_id: str | None, report: Mapping[str, Any]) -> None:
    """Record on a search's parent run the shared source model its trials start from: the tags
    ``lpcgma.source_model`` (its key), ``source_model.uri`` and ``source_model.run_id`` (the source
    stage's own run), and its metrics on the search's target as ``source_model/<metric>``. Never raises."""
    if not cfg.tracking.enabled or not parent_run_id:
        return
    try:
        client = tracking_client(resolve_tracking_uri(cfg.tracking))
        tags = {SOURCE_MODEL_TAG: str(report["key"]), "source_model.uri": str(report["uri"])}
        run_id = source_model_run(client, str(report["key"]))
        if run_id:
            tags["source_model.run_id"] = run_id
        for k, v in redact_mapping(tags)[0].items():
            client.set_tag(parent_run_id, k, v)
        metrics = {f"source_model/{k}": float(v) for k, v in report.get("metrics", {}).items() if "/" not in k}
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    except Exception as e:
        log.warning("could not link the source model to search run %s: %s", parent_run_id, e)


def end_search_run(parent_run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Set the parent run's final status."""
    client = tracking_client(resolve_tracking_uri(None, tracking_uri))
    retry(client.set_terminated, parent_run_id, status=status)


def child_runs(client: Any, parent_run_id: str) -> list[Any]:
    """All runs whose ``mlflow.parentRunId`` is `parent_run_id`."""
    parent = client.get_run(parent_run_id)
    return all_runs(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def ray_trial_status(results: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(trial id → MLflow status, trial id → error) from a Ray `ResultGrid` (or a list of Results)."""
    status: dict[str, str] = {}
    errors: dict[str, str] = {}
    if results is None or not hasattr(results, "__iter__"):
        return status, errors
    try:
        items = list(results)
    except Exception:
        return status, errors
    for r in items:
        metrics = getattr(r, "metrics", None) or {}
        tid = metrics.get("trial_id") if isinstance(metrics, Mapping) else None
        if tid is None:  # no report at all: the id is in the trial folder's name
            m = _TRIAL_DIR_ID.search(Path(str(getattr(r, "path", "") or "")).name)
            tid = m.group(1) if m else None
        if tid is None:
            continue
        err = getattr(r, "error", None)
        if err is not None:
            status[str(tid)] = "FAILED"
            errors[str(tid)] = f"{type(err).__name__}: {err}"
        else:
            status[str(tid)] = "KILLED"
    return status, errors


def finish_trial_runs(
    parent_run_id: str,
    trial_status: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, str]:
    """End every child run still RUNNING: FAILED (with the error) or KILLED; returns run id → status.

    `trial_status` maps Ray trial ids to a Ray status (``ERROR``, ``TERMINATED``, …) or an MLflow
    one; trials missing from it are KILLED (a run that did not end itself was stopped).
    """
    client = tracking_client(resolve_tracking_uri(None, tracking_uri))
    ended: dict[str, str] = {}
    for run in retry(child_runs, client, parent_run_id):
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        tid = run.data.tags.get(TRIAL_TAG, "")
        raw = (trial_status or {}).get(tid, "KILLED")
        status = _RAY_TO_MLFLOW.get(str(raw).upper(), "KILLED")
        error = (errors or {}).get(tid)
        if status == "KILLED" and error:
            status = "FAILED"
        rid = run.info.run_id
        if error:
            retry(client.set_tag, rid, ERROR_TAG, str(error)[:5000])
        elif status == "KILLED":
            retry(client.set_tag, rid, "stopped_by", "search scheduler or driver")
        retry(client.set_terminated, rid, status=status)
        ended[rid] = status
    return ended


# -------------------------------------------------------------------------------------- summary
@dataclass
class SearchSummary:
    """The parent run's summary: the trials table and the best trial."""

    rows: list[dict[str, Any]]
    metric: str
    mode: str
    best_trial_id: str | None
    best_run_id: str | None
    best_value: float | None
    artifacts: list[str] = field(default_factory=list)


def _parse(value: str) -> Any:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f


def trials_table(
    parent_run_id: str,
    metric: str = "target_miou",
    mode: str = "max",
    space_keys: Iterable[str] | None = None,
    tracking_uri: str | None = None,
    ray_rows: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per trial run: trial/run ids, status, best metric and step, the searched params."""
    client = tracking_client(resolve_tracking_uri(None, tracking_uri))
    runs = retry(child_runs, client, parent_run_id)
    runs.sort(key=lambda r: r.info.start_time or 0)
    if space_keys is None:  # the parent's search space, else the params that differ between trials
        parent = retry(client.get_run, parent_run_id)
        space_keys = sorted(k.removeprefix("space.") for k in parent.data.params if k.startswith("space."))
    if not space_keys:
        all_params = [r.data.params for r in runs]
        keys = sorted({k for p in all_params for k in p if not k.startswith(_BOOKKEEPING)})
        space_keys = [k for k in keys if len({p.get(k) for p in all_params}) > 1]
    keys = list(space_keys)
    by_trial = {str(r.get("trial_id")): r for r in (ray_rows or []) if r.get("trial_id") is not None}
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        best, step = retry(best_over_history, client, run.info.run_id, metric, mode)
        tid = run.data.tags.get(TRIAL_TAG, "")
        row: dict[str, Any] = {
            "trial_id": tid,
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "order": i,
            "status": run.info.status,
            f"best_{metric}": best,
            "best_step": step,
            "duration_s": ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000.0
            if run.info.start_time
            else math.nan,
        }
        for k in keys:
            row[k] = _parse(run.data.params[k]) if k in run.data.params else None
        for k, v in by_trial.get(tid, {}).items():
            if isinstance(v, (int, float, str, bool)) and not k.startswith("config/") and k not in row:
                row[f"ray.{k}"] = v
        rows.append(row)
    return _uniform_columns(rows)


def _uniform_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys in every row; a column mixing numbers and strings becomes strings (Parquet types)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    for k in keys:
        values = [r.get(k) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            for r in rows:
                r[k] = None if r.get(k) is None else str(r[k])
        elif kinds == {int, float}:
            for r in rows:
                r[k] = None if r.get(k) is None else float(r[k])
    return [{k: r.get(k) for k in keys} for r in rows]


def write_table(rows: list[dict[str, Any]], parquet: Path, csv: Path) -> None:
    """The trials table as Parquet (pyarrow) and CSV."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"trial_id": pa.array([], pa.string())})
    pq.write_table(table, parquet)
    pacsv.write_csv(table, csv)


def _study_from_rows(rows: list[dict[str, Any]], metric_col: str, params: Sequence[str], mode: str) -> Any:
    """An in-memory Optuna study replaying the trials (for Optuna's plots)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists: dict[str, Any] = {}
    for p in params:
        values = [r[p] for r in rows if r.get(p) is not None]
        if not values:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            lo, hi = min(values), max(values)
            if lo == hi:
                continue
            if all(isinstance(v, int) for v in values):
                dists[p] = IntDistribution(int(lo), int(hi))
            else:
                log_scale = lo > 0 and hi / lo > 20
                dists[p] = FloatDistribution(float(lo), float(hi), log=log_scale)
        elif len({str(v) for v in values}) > 1:
            dists[p] = CategoricalDistribution(sorted({str(v) for v in values}))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in rows:
        value = r.get(metric_col)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        ps = {
            p: (str(r[p]) if isinstance(d, CategoricalDistribution) else r[p])
            for p, d in dists.items()
            if r.get(p) is not None
        }
        study.add_trial(
            optuna.trial.create_trial(params=ps, distributions={p: dists[p] for p in ps}, value=float(value))
        )
    return study


def _save_axes(ax: Any, path: Path) -> None:
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def optuna_plots(study: Any, out_dir: Path) -> list[Path]:
    """Optuna's optimisation-history and parameter-importance plots (matplotlib) as PNGs."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        import matplotlib.pyplot as plt

        plt.switch_backend("Agg")
    from optuna.visualization import matplotlib as ovm

    written: list[Path] = []
    completed = [t for t in study.trials if t.value is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
        if completed:
            path = out_dir / "optimization_history.png"
            _save_axes(ovm.plot_optimization_history(study), path)
            written.append(path)
        if len(completed) >= 2 and any(t.params for t in completed):
            path = out_dir / "param_importances.png"
            for evaluator in _importance_evaluators():
                try:
                    _save_axes(ovm.plot_param_importances(study, evaluator=evaluator), path)
                    written.append(path)
                    break
                except Exception as e:  # fANOVA needs scikit-learn; fall back to PED-ANOVA
                    log.info("param-importance evaluator %s failed: %s", type(evaluator).__name__, e)
    return written


def _importance_evaluators() -> list[Any]:
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    return [FanovaImportanceEvaluator(seed=0), PedAnovaImportanceEvaluator()]


def log_search_summary(
    parent_run_id: str,
    metric: str = "target_miou",
    mode: str = "max",
    space_keys: Iterable[str] | None = None,
    results: Any = None,
    study: Any = None,
    tracking_uri: str | None = None,
) -> SearchSummary:
    """Log the trials table, Optuna's plots and the best trial to the parent run."""
    uri = resolve_tracking_uri(None, tracking_uri)
    client = tracking_client(uri)
    ray_rows = _ray_rows(results)
    rows = trials_table(parent_run_id, metric, mode, space_keys, uri, ray_rows)
    col = f"best_{metric}"
    scored = [r for r in rows if isinstance(r.get(col), (int, float)) and not math.isnan(r[col])]
    best = best_of(scored, mode, key=lambda r: r[col]) if scored else None
    params = [k for k in (rows[0] if rows else {}) if k not in (*_FIXED_COLUMNS, col) and not k.startswith("ray.")]
    summary = SearchSummary(
        rows,
        metric,
        mode,
        best["trial_id"] if best else None,
        best["run_id"] if best else None,
        float(best[col]) if best else None,
    )
    with tempfile.TemporaryDirectory(prefix="lpcgma-search-") as tmp:
        out = Path(tmp) / SUMMARY_DIR
        out.mkdir()
        write_table(rows, out / "trials.parquet", out / "trials.csv")
        try:
            plot_study = study if study is not None else _study_from_rows(rows, col, params, mode)
            optuna_plots(plot_study, out)
        except Exception as e:
            log.warning("Optuna plots skipped: %s", e)
        summary.artifacts = sorted(f"{SUMMARY_DIR}/{p.name}" for p in out.iterdir())
        retry(client.log_artifacts, parent_run_id, str(out), SUMMARY_DIR)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tags = {"n_trials": str(len(rows)), **{f"n_{k.lower()}": str(v) for k, v in counts.items()}}
    if best is not None:
        tags |= {"best_trial_id": str(best["trial_id"]), "best_run_id": best["run_id"]}
        retry(client.log_metric, parent_run_id, col, float(best[col]))
    for k, v in tags.items():
        retry(client.set_tag, parent_run_id, k, v)
    return summary


_BOOKKEEPING = ("train.out_dir", "train.resume", "train.progress", "train.device", "tracking.")
_FIXED_COLUMNS = ("trial_id", "run_id", "run_name", "order", "status", "best_step", "duration_s")


def _ray_rows(results: Any) -> list[dict[str, Any]]:
    """Rows of Ray's result dataframe (a ResultGrid, a DataFrame or a list of dicts), if given."""
    if results is None:
        return []
    try:
        if hasattr(results, "get_dataframe"):
            results = results.get_dataframe()
        if hasattr(results, "to_dict"):
            return list(results.to_dict("records"))
        return [dict(r) for r in results if isinstance(r, Mapping)]
    except Exception as e:
        log.info("Ray results not used in the summary: %s", e)
        return []


# ------------------------------------------------------------------------------ the two hooks
def on_search_start(
    cfg: ExperimentConfig,
    search_name: str,
    space: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    resume: bool = False,
) -> str | None:
    """Hook for `run_search`: the parent run's id (None when tracking is off or MLflow is down)."""
    if not cfg.tracking.enabled:
        return None
    try:
        return start_search_run(cfg, search_name, space, tags, resume)
    except Exception as e:
        log.warning("MLflow parent run for search %r not started: %s", search_name, e)
        return None


def on_search_end(
    cfg: ExperimentConfig,
    parent_run_id: str | None,
    results: Any = None,
    metric: str = "target_miou",
    mode: str = "max",
    space_keys: Iterable[str] | None = None,
    study: Any = None,
    trial_status: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    status: str = "FINISHED",
) -> SearchSummary | None:
    """Hook for `run_search`: end leftover trial runs, log the summary, end the parent run."""
    if not cfg.tracking.enabled or not parent_run_id:
        return None
    uri = resolve_tracking_uri(cfg.tracking)
    ray_status, ray_errors = ray_trial_status(results)
    summary = None
    try:
        finish_trial_runs(parent_run_id, {**ray_status, **(trial_status or {})}, {**ray_errors, **(errors or {})}, uri)
    except Exception as e:
        log.warning("could not end the remaining trial runs of %s: %s", parent_run_id, e)
    try:
        summary = log_search_summary(parent_run_id, metric, mode, space_keys, results, study, uri)
    except Exception as e:
        log.warning("search summary not logged to %s: %s", parent_run_id, e)
    try:
        end_search_run(parent_run_id, status, uri)
    except Exception as e:
        log.warning("parent run %s not ended: %s", parent_run_id, e)
    return summary


__all__ = [
    "SearchSummary",
    "child_runs",
    "end_search_run",
    "find_search_runs",
    "finish_trial_runs",
    "log_search_summary",
    "on_search_end",
    "on_search_start",
    "optuna_plots",
    "ray_trial_status",
    "start_search_run",
    "trial_tags",
    "trials_table",
    "write_table",
]
