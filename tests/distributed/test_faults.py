"""Faults injected for real during a search (slow): a trial's process killed with SIGKILL, the Tune
driver killed with SIGKILL, a node of a two-node cluster removed, and a trial whose loss becomes
non-finite. Each search runs as its own `lpcgma tune` process group (stopped by its id); MLflow is
the sqlite store of the test's folder."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from raytest_helpers import VENV_BIN, join_ray_node, pids_using, run_cli, start_ray_head, stop_pids

pytestmark = pytest.mark.slow

SEARCH_TIMEOUT = 300


def rows(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p for p in exp.glob("lpcgma_trial_*") if p.is_dir())


def tune_cmd(store: Path, name: str, *args: str) -> list[str]:
    return [
        str(VENV_BIN / "lpcgma"),
        "tune",
        "--smoke-test",
        "--storage",
        str(store),
        "--name",
        name,
        "--max-failures",
        "2",
        *args,
    ]


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: Callable[[], object], proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> object:
    """Poll `what` until it returns something truthy (fails if the search ends or time runs out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"condition not reached (rc={proc.poll()}):\n{log.read_text()[-5000:]}")


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = SEARCH_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    return text


def ray_processes(marker: str, role: str) -> list[int]:
    """PIDs of Ray worker processes of this test (environment mentions `marker`) whose title has `role`."""
    found = []
    for pid in pids_using(marker):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::") and role in title:
            found.append(pid)
    return found


def mlflow_trial_runs(db: Path) -> list:  # type: ignore[type-arg]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("lpcgma-synthetic")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("lpcgma.role") == "trial"]


def metric_steps(db: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key))


def tracked_env(tmp: Path) -> tuple[dict[str, str], Path]:
    db = tmp / "mlflow.db"
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, db


LONG_TRIALS = ("train.iters=24", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=1")


@pytest.mark.parametrize(("workers", "role"), [(1, "ImplicitFunc"), (2, "RayTrainWorker")])
def test_killed_trial_process_restarts_from_its_checkpoint_with_each_step_logged_once(
    ray_tmp: Path, workers: int, role: str
) -> None:
    env, db = tracked_env(ray_tmp)
    store, name = ray_tmp / "store", f"kill{workers}"
    cmd = tune_cmd(store, name, "--num-samples", "1", "--workers-per-trial", str(workers), *LONG_TRIALS)
    log = ray_tmp / "search.log"
    proc = start(cmd, env, ray_tmp, log)
    try:
        exp = store / name
        wait_for(lambda: any(r.get("step") == 8 for d in trial_dirs(exp) for r in rows(d)), proc, log)
        victims = ray_processes(str(ray_tmp), role)
        assert victims, "no trial process found to kill"
        os.kill(victims[0], signal.SIGKILL)
        text = finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (trial,) = trial_dirs(store / name)
    assert any(r.get("step") == 24 for r in rows(trial)), text[-4000:]
    (run,) = mlflow_trial_runs(db)  # the restarted trial continued its run
    run_file = next(exp.glob("lpcgma_trial_*/run/mlflow_run.json")).read_text()
    if run.info.status != "FINISHED":
        pytest.fail(f"run {run.info.status}: {run.data.tags}\n{run_file}\n{text[-8000:]}")
    assert metric_steps(db, run.info.run_id, "loss/total") == list(range(1, 25))
    assert metric_steps(db, run.info.run_id, "target_miou") == [4, 8, 12, 16, 20, 24]
    assert "1 trials" in text or "1 trial" in text
    if workers == 1:  # Tune restarted the trial (a worker group restarts inside Train, unseen by Tune)
        assert "1 retried after a failure" in text and "retried 1×" in text, text[-4000:]


def test_trial_with_non_finite_loss_fails_with_its_reason_and_the_search_goes_on(ray_tmp: Path) -> None:
    env, db = tracked_env(ray_tmp)
    space = ray_tmp / "nan_space.yaml"
    space.write_text("optim.lr:\n  type: choice\n  values: [0.001, 1.0e30]\n")
    store = ray_tmp / "store"
    r = run_cli(
        [
            *tune_cmd(store, "nan", "--num-samples", "3", "--max-concurrent", "1", "--search-space", str(space)),
            "--seed",
            "1",
            "optim.warmup_iters=0",
        ],
        env,
        ray_tmp,
        timeout=SEARCH_TIMEOUT,
    )
    params = {d.name: json.loads((d / "params.json").read_text()) for d in trial_dirs(store / "nan")}
    bad = [n for n, p in params.items() if p["optim.lr"] > 1]
    assert len(params) == 3 and bad, f"the sampler chose no diverging trial: {params}"
    assert r.returncode != 0, "a search with failed trials must not exit 0"
    assert "failed" in r.stdout.lower()
    good = [n for n in params if n not in bad]
    assert all(any("target_miou" in row for row in rows(store / "nan" / n)) for n in good)
    runs = mlflow_trial_runs(db)
    failed = [x for x in runs if x.info.status == "FAILED"]
    assert len(failed) == len(bad) and len(runs) == 3
    assert all("non-finite loss" in x.data.tags.get("error", "") for x in failed)
    assert r.stdout.count("failed: NonFiniteLossError: non-finite loss") == len(bad), r.stdout[-3000:]
    # the searcher was told: the Optuna study Tune saved with the experiment has them as FAIL
    (state_file,) = sorted((store / "nan").glob("searcher-state-*.pkl"))[-1:]
    with open(state_file, "rb") as f:
        study = pickle.load(f)["_ot_study"]  # our own test's file
    assert sorted(t.state.name for t in study.trials) == sorted(["COMPLETE"] * len(good) + ["FAIL"] * len(bad))


def test_driver_killed_with_sigkill_then_resume_finishes_with_one_run_per_trial(ray_tmp: Path) -> None:
    env, db = tracked_env(ray_tmp)
    store, name = ray_tmp / "store", "killed"
    # no ASHA stop (grace period = the 4 evaluations): every trial must reach its last step
    args = ("--num-samples", "3", "--max-concurrent", "1", "--grace-period", "4", "train.iters=8", "train.log_every=1")
    log = ray_tmp / "first.log"
    proc = start(tune_cmd(store, name, *args), env, ray_tmp, log)
    exp = store / name
    try:
        finished = wait_for(lambda: [d for d in trial_dirs(exp) if any(r.get("step") == 8 for r in rows(d))], proc, log)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver machine is gone: no chance to save anything
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stop_pids(pids_using(str(ray_tmp)))  # what the dead driver's local cluster left behind
    before = {d.name: len(rows(d)) for d in finished}  # type: ignore[union-attr]
    r = run_cli(
        [str(VENV_BIN / "lpcgma"), "tune", "--resume", "--storage", str(store), "--name", name],
        env,
        ray_tmp,
        timeout=SEARCH_TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-5000:]
    # A trial Ray started in the instant before the SIGKILL, after its last experiment snapshot, is
    # unknown to the restored search: its folder stays behind without results and a new trial takes
    # its place; if it had opened its MLflow run, the search's end marks that run KILLED.
    dirs = [d for d in trial_dirs(exp) if rows(d)]
    orphans = [d.name.split("_")[2] for d in trial_dirs(exp) if not rows(d)]  # lpcgma_trial_<id>_…
    assert len(dirs) == 3, ([d.name for d in dirs], orphans)
    assert len(orphans) <= 1, orphans
    for trial, n in before.items():
        assert len(rows(exp / trial)) == n, f"finished trial {trial} was rerun"
    all_runs = mlflow_trial_runs(db)
    orphan_runs = [x for x in all_runs if x.data.tags.get("ray.trial_id") in orphans]
    assert all(x.info.status == "KILLED" for x in orphan_runs), [(x.info.status, x.data.tags) for x in orphan_runs]
    runs = [x for x in all_runs if x not in orphan_runs]
    trial_ids = [x.data.tags.get("ray.trial_id") for x in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3, (trial_ids, orphans)
    assert all(x.info.status == "FINISHED" for x in runs), [(x.info.status, x.data.tags) for x in runs]
    for x in runs:
        assert metric_steps(db, x.info.run_id, "loss/total") == list(range(1, 9))


def test_a_removed_node_s_trial_is_rescheduled_and_the_search_completes(ray_tmp: Path) -> None:
    env = dict(os.environ)
    node_marker = f"LPCGMA_TEST_NODE_B={ray_tmp.name}"
    try:
        address = start_ray_head(ray_tmp, env)
        node_env = {**env, "LPCGMA_TEST_NODE_B": ray_tmp.name}  # every process of node B inherits it
        join_ray_node(address, node_env, ray_tmp)
        assert pids_using(node_marker), "node B's processes not found"
        store, name = ray_tmp / "store", "nodeloss"
        log = ray_tmp / "search.log"
        cmd = tune_cmd(
            store, name, "--num-samples", "2", "--address", "auto", "--grace-period", "6", *LONG_TRIALS
        )  # no ASHA stop: both trials must reach their last step
        cmd.append("tracking.enabled=false")
        proc = start(cmd, {**env, "RAY_ADDRESS": address}, ray_tmp, log)
        try:
            exp = store / name

            def both_running() -> bool:  # one trial per node: each node has one CPU
                return sum(any(row.get("step") == 4 for row in rows(d)) for d in trial_dirs(exp)) == 2

            wait_for(both_running, proc, log)
            stop_pids(pids_using(node_marker))  # node B goes away (its raylet and its workers)
            text = finish(proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        dirs = trial_dirs(store / name)
        assert len(dirs) == 2
        assert all(any(r.get("step") == 24 for r in rows(d)) for d in dirs), text[-4000:]
        nodes = {r["node_id"] for d in dirs for r in rows(d)}
        assert len(nodes) == 2, "the trials never ran on both nodes"
        moved = [d for d in dirs if len({r["node_id"] for r in rows(d)}) == 2]
        assert moved, "no trial was rescheduled off the removed node"
    finally:
        stop_pids(pids_using(str(ray_tmp)))
