"""Search-level tracking: parent run, trial children, summary, no run left RUNNING."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient
from tracking_helpers import all_artifacts, fake_report, fake_trainer, synthetic_cfg

from lpcgma.engine.trainer import TrainResult
from lpcgma.tracking.runs import MLflowCallback
from lpcgma.tracking.search import on_search_end, on_search_start, trial_tags


def test_parent_children_summary_and_leftover_trials(tmp_path: Path, file_store: str) -> None:
    base = synthetic_cfg(tmp_path / "base", file_store)
    space = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    parent = on_search_start(base, "smoke-1", space=space)
    assert parent is not None
    ids = {}
    for i, (lr, fate) in enumerate([(1e-3, "finish"), (3e-3, "stopped"), (5e-4, "fail"), (2e-3, "finish")]):
        cfg = synthetic_cfg(tmp_path / f"t{i}", file_store, f"optim.lr={lr}")
        cb = MLflowCallback(cfg, parent_run_id=parent, tags=trial_tags("smoke-1", f"t{i}"))
        cb.on_train_start(fake_trainer(cfg))
        report = fake_report(1 + i, None, False)
        report.previews, report.confusion = [], None
        cb.on_eval(report)
        if fate == "finish":
            cb.on_train_end(TrainResult(4, Path(cfg.train.out_dir), {}, 0.1, 1, None, None))
        elif fate == "fail":
            cb.on_exception(RuntimeError("boom"))
        ids[f"t{i}"] = cb.run_id  # "stopped": killed by the scheduler, never ends itself

    summary = on_search_end(base, parent, trial_status={"t1": "TERMINATED"})
    client = MlflowClient(file_store)
    status = {t: client.get_run(r).info.status for t, r in ids.items()}
    assert status == {"t0": "FINISHED", "t1": "KILLED", "t2": "FAILED", "t3": "FINISHED"}
    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED"
    assert prun.data.tags["lpcgma.role"] == "search" and prun.data.tags["search"] == "smoke-1"
    assert prun.data.params["space.optim.lr"].startswith("loguniform(")
    assert summary is not None and summary.best_trial_id == "t3"  # target_miou 0.1·4
    assert prun.data.tags["best_trial_id"] == "t3" and prun.data.tags["best_run_id"] == ids["t3"]
    assert abs(prun.data.metrics["best_target_miou"] - 0.4) < 1e-9
    files = set(all_artifacts(client, parent))
    assert {
        "summary/trials.parquet",
        "summary/trials.csv",
        "summary/optimization_history.png",
        "summary/param_importances.png",
        "search_space.yaml",
        "base_config.yaml",
    } <= files
    local = client.download_artifacts(parent, "summary/trials.parquet", str(tmp_path / "dl"))
    table = pq.read_table(local).to_pylist()
    assert sorted(r["trial_id"] for r in table) == ["t0", "t1", "t2", "t3"]
    assert {r["trial_id"]: r["optim.lr"] for r in table}["t1"] == 3e-3
    assert {r["trial_id"]: r["status"] for r in table}["t1"] == "KILLED"

    resumed = on_search_start(base, "smoke-1", space=space, resume=True)
    assert resumed == parent and client.get_run(parent).info.status == "RUNNING"


def test_ray_results_give_trial_status_and_errors() -> None:
    from types import SimpleNamespace

    from lpcgma.tracking.search import ray_trial_status

    results = [
        SimpleNamespace(metrics={"trial_id": "ab12c_00000"}, error=None, path=""),
        SimpleNamespace(metrics={}, error=RuntimeError("nan loss"), path="/r/lpcgma_trial_3a2b1_00001_1_lr=0.1_2026"),
    ]
    status, errors = ray_trial_status(results)
    assert status == {"ab12c_00000": "KILLED", "3a2b1_00001": "FAILED"}
    assert errors == {"3a2b1_00001": "RuntimeError: nan loss"}


def test_a_search_without_a_successful_trial_ends_its_parent_run_failed(tmp_path: Path, file_store: str) -> None:
    from lpcgma.distributed.search_mlflow import mlflow_hooks
    from lpcgma.distributed.search_types import SearchInfo, SearchOutcome, SearchSettings, TrialSummary
    from lpcgma.search_space import load_search_space

    base = synthetic_cfg(tmp_path / "base", file_store)
    space = load_search_space("smoke", base=base)
    start, end = mlflow_hooks()
    client = MlflowClient(file_store)
    cases = (("all_failed", ["error", "error"], "FAILED"), ("one_ok", ["error", "finished"], "FINISHED"))
    for name, statuses, expected in cases:
        info = SearchInfo(name, str(tmp_path), str(tmp_path / name), base, space, {}, SearchSettings(name=name))
        info.parent_run_id = start(info)
        trials = [TrialSummary(f"t{i}", s, None if s == "error" else 0.3, 1, {}, None, None, False, None)
                  for i, s in enumerate(statuses)]  # fmt: skip
        end(info, SearchOutcome(str(tmp_path / name), "target_miou", "max", trials))
        assert client.get_run(info.parent_run_id).info.status == expected  # type: ignore[arg-type]
