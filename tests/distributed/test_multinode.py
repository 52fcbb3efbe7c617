"""A real two-node Ray cluster on this machine (slow): `ray start --head` + `ray start --address`,
each node with one CPU, and `experiments/tune_synthetic.py --smoke-test --address auto` against it:
the trials run on both nodes and finish. Both nodes are stopped by PID (never `ray stop`, which would
stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from raytest_helpers import REPO, VENV_BIN, join_ray_node, pids_using, run_cli, start_ray_head, stop_pids

pytestmark = pytest.mark.slow


def test_smoke_search_spreads_over_two_nodes(ray_tmp: Path) -> None:
    env = dict(os.environ)
    try:
        address = start_ray_head(ray_tmp, env, '--resources={"trial_driver": 2}')
        join_ray_node(address, env, ray_tmp, '--resources={"node_b": 1}')
        r = run_cli(
            [
                str(VENV_BIN / "python"),
                str(REPO / "experiments" / "tune_synthetic.py"),
                "--smoke-test",
                "--address",
                "auto",
                "--num-samples",
                "2",
                "--storage",
                str(ray_tmp / "store"),
                "--name",
                "multinode",
                "tracking.enabled=false",
            ],
            env,
            ray_tmp,
            timeout=240,
        )
        assert r.returncode == 0, r.stdout[-5000:]
        exp = ray_tmp / "store" / "multinode"
        rows = [json.loads(x) for d in exp.glob("lpcgma_trial_*") for x in (d / "result.json").read_text().splitlines()]
        assert {row["trial_id"] for row in rows} and len({row["trial_id"] for row in rows}) == 2
        assert len({row["node_id"] for row in rows}) == 2, "trials did not spread over both nodes"
        assert all("target_miou" in row for row in rows)
    finally:
        stop_pids(pids_using(str(ray_tmp)))
