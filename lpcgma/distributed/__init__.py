"""Ray Train (the trainer across workers) and Ray Tune + Optuna + ASHA (searches over configs).

`search_space` loads and validates YAML search spaces; `train` runs the Trainer as a Ray Train
worker function; `search` runs searches (`run_search`) from `search_types` (settings, results),
`resources` (the plan), `trial` (the Tune trial), `tuner` (+ `asha`), `search_summary` and `storage`;
`search_mlflow` and `search_cli` are their MLflow hooks and command-line faces. Ray is imported
lazily (only `asha` imports it at the top): importing this package does not start or import Ray.
"""

from __future__ import annotations

from lpcgma.distributed.search_space import (
    SearchSpace,
    SearchSpaceError,
    defaults_point,
    load_search_space,
    packaged_search_spaces,
)

__all__ = [
    "SearchSpace",
    "SearchSpaceError",
    "defaults_point",
    "load_search_space",
    "packaged_search_spaces",
]
