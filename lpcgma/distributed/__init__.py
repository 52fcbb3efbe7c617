"""Ray Train (the trainer across workers) and Ray Tune + Optuna + ASHA (searches over configs).

`search_space` loads and validates YAML search spaces; `train` runs the Trainer as a Ray Train
worker function; `tune` runs searches (`run_search`). Ray is imported lazily: importing this
package does not start or import Ray.
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
