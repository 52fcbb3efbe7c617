"""A real two-node Ray cluster on this machine (slow): `ray start --head` + `ray start --address`,
each node with one CPU, and `experiments/tune_synthetic.py --smoke-test --address auto` against it:
the trials run on both nodes and finish. Both nodes are stopped by PID (never `ray stop`, which would
stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from raytest_helpers import REPO, VENV_BIN, free_port, pids_using, run_cli, stop_pids

pytestmark = pytest.mark.slow


def test_smoke_search_spreads_over_two_nodes(ray_tmp: Path) -> None:
    env = dict(os.environ)
    ray = str(VENV_BIN / "ray")
    port = free_port()
    head = run_cli(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"trial_driver": 2}',
            f"--temp-dir={ray_tmp / 'ray'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            "--disable-usage-stats",
        ],
        env,
        ray_tmp,
        timeout=120,
    )
    try:
        assert head.returncode == 0, head.stdout[-3000:]
        address = re.search(r"--address='?([\w.-]+:\d+)", head.stdout).group(1)  # type: ignore[union-attr]
        worker = run_cli(
            [
                ray,
                "start",
                f"--address={address}",
                "--num-cpus=1",
                '--resources={"node_b": 1}',
                "--disable-usage-stats",
            ],
            env,
            ray_tmp,
            timeout=120,
        )
        assert worker.returncode == 0, worker.stdout[-3000:]
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
