"""An interrupted search resumes (slow): `lpcgma tune` gets Ctrl-C after its first trial finished;
`lpcgma tune --resume` completes the search without rerunning that trial or the defaults point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from raytest_helpers import VENV_BIN, run_cli

pytestmark = pytest.mark.slow


def rows(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.glob("lpcgma_trial_*") if p.is_dir())


def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_tmp: Path) -> None:
    store = ray_tmp / "store"
    exp = store / "resumable"
    cmd = [
        str(VENV_BIN / "lpcgma"),
        "tune",
        "--smoke-test",
        "--num-samples",
        "3",
        "--max-concurrent",
        "1",
        "--storage",
        str(store),
        "--name",
        "resumable",
        "tracking.enabled=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TUNE_DISABLE_SIGINT_HANDLER"}  # a user's Tune
    log = open(ray_tmp / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, cwd=ray_tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        finished: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            finished = [d for d in trial_dirs(exp) if any(r.get("step") == 4 for r in rows(d))]
            if finished:
                break
            time.sleep(0.5)
        assert finished, (ray_tmp / "first.log").read_text()[-4000:]
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    first_log = (ray_tmp / "first.log").read_text()
    assert rc == 130, first_log[-4000:]
    assert "lpcgma tune --resume" in first_log
    before = {d.name: len(rows(d)) for d in finished}

    r = run_cli(
        [str(VENV_BIN / "lpcgma"), "tune", "--resume", "--storage", str(store), "--name", "resumable"],
        env,
        ray_tmp,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-4000:]
    dirs = trial_dirs(exp)
    assert len(dirs) == 3, [d.name for d in dirs]
    for name, n in before.items():  # finished trials were not rerun
        assert len(rows(exp / name)) == n, name
    assert all(any("target_miou" in row for row in rows(d)) for d in dirs)
    params = [json.loads((d / "params.json").read_text()) for d in dirs]
    defaults = {"optim.lr": 0.001, "optim.head_lr_mult": 10.0}
    assert sum(p == defaults for p in params) == 1  # the defaults point ran once: the searcher kept its history
    assert "3 trials" in r.stdout
