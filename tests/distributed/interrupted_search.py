"""Run only by `test_interrupt.py` (pytest does not collect it: no ``test_`` prefix): an in-process
Ray Tune search whose one trial sleeps, for the outer test to interrupt with Ctrl-C."""

from __future__ import annotations

import os
import time
from pathlib import Path


def test_search_interrupted_by_ctrl_c(ray_tmp: Path) -> None:
    import ray
    from ray import tune

    started_file = os.environ["LPCGMA_STARTED_FILE"]

    def sleeping_trial(config: dict) -> None:  # nested: pickled by value (workers cannot import this file)
        Path(started_file).write_text("started")
        time.sleep(600)

    ray.init(num_cpus=1, include_dashboard=False)
    tuner = tune.Tuner(
        sleeping_trial,
        param_space={"a": 1},
        run_config=tune.RunConfig(storage_path=str(ray_tmp / "store"), name="interrupted", verbose=0),
    )
    results = tuner.fit()  # Ctrl-C must end the session here, not stop the search and let the test pass
    assert not results.errors, results.errors
