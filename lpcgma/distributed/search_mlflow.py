"""MLflow around a search: the `run_search` hooks that keep a parent run per search (with the trials'
runs as its children), the closing lines that say where to look, and promotion of the best trial.

`lpcgma.tracking` sits below `lpcgma.distributed` (docs/ARCHITECTURE.md) and is imported plainly: an
import error in it fails the search loudly instead of silently turning tracking off."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lpcgma.distributed.search_types import SearchInfo, SearchOutcome
from lpcgma.search_space import space_mapping
from lpcgma.tracking import registry
from lpcgma.tracking.search import on_search_end, on_search_start
from lpcgma.tracking.store import resolve_tracking_uri, run_url, tracking_client, ui_command


def mlflow_hooks() -> tuple[Callable[[SearchInfo], str | None], Callable[[SearchInfo, SearchOutcome], None]]:
    """`run_search` hooks that keep a parent MLflow run per search (lpcgma.tracking.search).

    Start: the parent run (continued on --resume), the search space as params. End: ends the runs
    of trials ASHA stopped or that failed, logs the trials table and Optuna plots, ends the parent.
    Both are no-ops when tracking is off.
    """

    def start(info: SearchInfo) -> str | None:
        return on_search_start(
            info.base_config,
            info.name,
            space=space_mapping(info.space),
            tags={"ray.experiment_path": info.experiment_path},
            resume=info.settings.resume,
        )

    def end(info: SearchInfo, outcome: SearchOutcome) -> None:
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
    uri = resolve_tracking_uri(info.base_config.tracking)
    lines = [f"MLflow: {ui_command(uri)}"]
    if info.parent_run_id:
        lines.append(f"  search run:  {info.parent_run_id}")
    if summary is not None and summary.best_run_id:
        exp_id = tracking_client(uri).get_run(summary.best_run_id).info.experiment_id
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
    """Register the best trial as the champion (``lpcgma.tracking.registry.promote``); False when refused."""
    try:
        result = registry.promote(search_name, metric=metric, mode=mode, model_name=model_name)
    except (registry.PromotionRefused, registry.PromotionError, ValueError) as e:
        print(f"not promoted: {e}", file=sys.stderr)
        return False
    print(f"promoted: {getattr(result, 'model_uri', result)}")
    return True
