"""MLflowCallback against a throw-away store, driven by a stand-in trainer (no training)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tracking_helpers import all_artifacts, fake_report, fake_trainer, synthetic_cfg, write_fake_checkpoint

from lpcgma.config import dump_config, flatten
from lpcgma.engine.checkpoint import model_state, read_checkpoint, write_checkpoint
from lpcgma.engine.trainer import TrainResult
from lpcgma.tracking.runs import RUN_FILE, MLflowCallback, exception_status

PLANTED = "planted-AKIA-secret-value-0123456789"


def _run_lifecycle(cfg, cb: MLflowCallback, ckpt_root: Path) -> None:
    trainer = fake_trainer(cfg)
    cb.on_train_start(trainer)
    cb.on_log(1, {"loss/total": 2.0, "lr": 0.1})
    cb.on_log(2, {"loss/total": 1.5, "lr": 0.09})
    c2 = write_fake_checkpoint(ckpt_root, 2, cfg)
    best = write_checkpoint(ckpt_root / "best", model_state(read_checkpoint(c2)), dump_config(cfg))  # as the trainer
    cb.on_eval(replace(fake_report(2, c2, is_best=True), best_checkpoint=best))
    c4 = write_fake_checkpoint(ckpt_root, 4, cfg)
    cb.on_eval(fake_report(4, c4, is_best=False))
    result = TrainResult(4, Path(cfg.train.out_dir), {}, 0.2, 2, ckpt_root / "best", c4)
    cb.on_train_end(result)


def test_a_tracked_run_has_params_tags_metrics_and_artifacts(
    tmp_path: Path, file_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    cfg = synthetic_cfg(tmp_path / "run", file_store, f"data.root=/data/{PLANTED}")
    cb = MLflowCallback(cfg, tags={"ray.trial_id": "abc_00001", "search": "s1", "api_token": "tok-should-not-leak"})
    _run_lifecycle(cfg, cb, tmp_path / "run/checkpoints")
    client = MlflowClient(file_store)
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.params) == set(flatten(cfg))  # every resolved key, dotted names
    assert run.data.params["method.name"] == "self_training"
    tags = run.data.tags
    assert tags["method"] == "self_training" and tags["dataset"] == "synthetic"
    assert tags["domains"] == "rural → urban" and tags["ray.trial_id"] == "abc_00001" and tags["search"] == "s1"
    assert tags["git_commit"] and tags["lpcgma.role"] == "train" and "api_token" not in tags
    assert [(m.step, m.value) for m in client.get_metric_history(cb.run_id, "loss/total")] == [
        (1, 2.0),
        (2, 1.5),
    ]
    assert [m.step for m in client.get_metric_history(cb.run_id, "target_miou")] == [2, 4]
    assert [m.step for m in client.get_metric_history(cb.run_id, "target_iou/road")] == [2, 4]
    assert client.get_metric_history(cb.run_id, "pmc/anchors")[0].value == 12.0
    assert [m.step for m in client.get_metric_history(cb.run_id, "pseudo/accuracy")] == [4]
    files = set(all_artifacts(client, cb.run_id))
    expected = {
        "config.yaml",
        "classes.json",
        "plots/legend.png",
        "plots/confusion_matrix/step_00000002.png",
        "plots/confusion_matrix/step_00000004.png",
        "plots/iou/step_00000002.png",
        "plots/pseudo_labels/step_00000004.png",
        "plots/pseudo_confusion/step_00000004.png",
        "overlays/step_00000004/01_tile_1.png",
        "checkpoints/best/state.pt",
        "checkpoints/best/config.yaml",
        "checkpoints/final/state.pt",
        "checkpoints/final/config.yaml",
    }
    assert expected <= files
    assert not any(f.startswith("checkpoints/step_") for f in files)  # only best + final in MLflow
    logged = read_checkpoint(Path(client.download_artifacts(cb.run_id, "checkpoints/final", str(tmp_path / "fin"))))
    assert set(logged) == {"step", "method", "method_name", "class_names"}  # the model, not the optimiser
    assert logged["method"] and all(k.startswith("student.") for k in logged["method"])
    assert logged["step"] == 4
    logged_best = read_checkpoint(Path(client.download_artifacts(cb.run_id, "checkpoints/best", str(tmp_path / "b"))))
    assert logged_best["step"] == 2 and set(logged_best["method"]) == {"student.w"}
    # `best` is already the model: logged from its folder, no second copy; the final step checkpoint's is kept
    assert [p.name for p in (tmp_path / "run/mlflow_models").iterdir()] == ["checkpoints_final"]
    # no secret anywhere: params, tags, text artifacts
    local = Path(client.download_artifacts(cb.run_id, "", str(tmp_path / "dl")))
    texts = [p.read_text(errors="ignore") for p in local.rglob("*") if p.suffix in (".yaml", ".json")]
    everything = json.dumps(run.data.params) + json.dumps(run.data.tags) + "".join(texts)
    assert PLANTED not in everything and "tok-should-not-leak" not in everything
    record = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert record["run_id"] == cb.run_id and record["status"] == "FINISHED"


def test_child_run_of_a_search_and_exceptions(tmp_path: Path, file_store: str) -> None:
    cfg = synthetic_cfg(tmp_path / "t1", file_store)
    client = MlflowClient(file_store)
    exp = client.create_experiment("tests")
    parent = client.create_run(exp).info.run_id
    cb = MLflowCallback(cfg, parent_run_id=parent, tags={"ray.trial_id": "t1"})
    cb.on_train_start(fake_trainer(cfg))
    cb.on_exception(FloatingPointError("non-finite loss at step 3: loss/total=nan"))
    run = client.get_run(cb.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["lpcgma.role"] == "trial"
    assert "non-finite loss" in run.data.tags["error"]

    cfg2 = synthetic_cfg(tmp_path / "t2", file_store)
    cb2 = MLflowCallback(cfg2, parent_run_id=parent)
    cb2.on_train_start(fake_trainer(cfg2))
    cb2.on_exception(KeyboardInterrupt())
    assert client.get_run(cb2.run_id).info.status == "KILLED"


def test_other_ranks_and_disabled_tracking_log_nothing(tmp_path: Path, file_store: str) -> None:
    cfg = synthetic_cfg(tmp_path / "r1", file_store)
    trainer = fake_trainer(cfg)
    trainer.is_main, trainer.rank = False, 1
    cb = MLflowCallback(cfg)
    cb.on_train_start(trainer)
    cb.on_log(1, {"loss/total": 1.0})
    cb.on_eval(fake_report(1, None, False))
    cb.on_exception(RuntimeError("x"))
    assert cb.run_id is None and cb.logger is None
    off = synthetic_cfg(tmp_path / "r2", file_store, "tracking.enabled=false")
    cb_off = MLflowCallback(off)
    cb_off.on_train_start(fake_trainer(off))
    assert cb_off.logger is None


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path, file_store: str) -> None:
    cfg = synthetic_cfg(tmp_path / "run", file_store)
    first = MLflowCallback(cfg)
    first.on_train_start(fake_trainer(cfg))
    first.on_log(1, {"loss/total": 3.0})
    first.on_exception(KeyboardInterrupt())  # the process is stopped
    second = MLflowCallback(cfg)
    second.on_train_start(fake_trainer(cfg, step=1))  # resumed from a checkpoint at step 1
    second.on_log(2, {"loss/total": 2.0})
    second.on_train_end(TrainResult(2, tmp_path / "run", {}, 0.1, -1, None, None))
    assert second.run_id == first.run_id
    client = MlflowClient(file_store)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/total")] == [1, 2]
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1


def test_a_resumed_run_logs_each_replayed_step_once(tmp_path: Path, file_store: str) -> None:
    """Crash at step 3 after the checkpoint of step 2: the resumed run replays step 3 (and the
    evaluation of step 3) but MLflow keeps one point per step, with nothing missing."""
    cfg = synthetic_cfg(tmp_path / "run", file_store, "tracking.log_overlays=0")
    first = MLflowCallback(cfg)
    first.on_train_start(fake_trainer(cfg))
    for step in (1, 2, 3):
        first.on_log(step, {"loss/total": 1.0 / step})
    first.on_eval(fake_report(3, None, is_best=False))
    # killed: no on_exception, no end of run (SIGKILL)
    second = MLflowCallback(cfg)
    second.on_train_start(fake_trainer(cfg, step=2))
    for step in (3, 4):
        second.on_log(step, {"loss/total": 1.0 / step})
    second.on_eval(fake_report(3, None, is_best=False))
    second.on_eval(fake_report(4, None, is_best=False))
    second.on_train_end(TrainResult(4, tmp_path / "run", {}, 0.4, 4, None, None))
    assert second.run_id == first.run_id
    client = MlflowClient(file_store)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/total")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(first.run_id, "target_miou")] == [3, 4]
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["logged_steps"] == {"log": 4, "eval": 4}


def test_stop_requests_are_killed_other_errors_failed() -> None:
    class TrialStopped(Exception):
        pass

    assert exception_status(KeyboardInterrupt()) == "KILLED"
    assert exception_status(SystemExit(0)) == "KILLED"
    assert exception_status(TrialStopped()) == "KILLED"
    assert exception_status(ValueError("bad")) == "FAILED"
