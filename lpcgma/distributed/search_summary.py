"""A finished (or interrupted) search's Ray `ResultGrid` → a `SearchOutcome`: one `TrialSummary` per
trial with its best objective, status, params, checkpoint and error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lpcgma.distributed.search_types import SearchOutcome, TrialSummary
from lpcgma.search_space import values_close


def summarize(
    results: Any, objective: str, mode: str, defaults: Mapping[str, Any], experiment_path: str, max_t: int
) -> SearchOutcome:
    """One `TrialSummary` per trial of a ResultGrid: best objective, status, params, checkpoint."""
    trials: list[TrialSummary] = []
    for result, failures in zip(results, _failure_counts(results), strict=True):
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
            bool(params)
            and len(params) == len(defaults)
            and all(values_close(params[k], defaults[k]) for k in defaults)
        )
        error = error_line(result.error) if result.error is not None else None
        retries = max(0, failures - 1) if result.error is not None else failures  # the last failure ended it
        trials.append(
            TrialSummary(trial_id, status, best, evaluations, params, checkpoint, out_dir, is_defaults, error, retries)
        )
    return SearchOutcome(experiment_path, objective, mode, trials, results)


def _failure_counts(results: Any) -> list[int]:
    """How often each trial of a ResultGrid failed (Ray's `Trial.num_failures`, in the grid's order).

    The grid exposes only each trial's last error, not the failures Ray retried, so this reads the
    trials of its experiment analysis (Ray is pinned: 2.60); 0 for every trial where it cannot."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    n = len(results)
    if trials is None or len(trials) != n:
        return [0] * n
    return [int(getattr(trial, "num_failures", 0) or 0) for trial in trials]


def error_line(error: BaseException) -> str:
    """The root cause of a trial's error, one line: Ray wraps the trial's exception in its own."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
