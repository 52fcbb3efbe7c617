"""Integration: real `mlflow server` processes on 127.0.0.1 (and a moto S3 server), real training.

Each test starts and stops its servers by PID. Trainings are tiny (4-6 steps on 4 synthetic tiles).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from tracking_helpers import (
    REPO,
    MlflowServer,
    all_artifacts,
    fake_report,
    fake_trainer,
    free_port,
    stop_process,
    synthetic_cfg,
    wait_http,
    write_fake_checkpoint,
)

from lpcgma.cli import main
from lpcgma.config import load_config
from lpcgma.engine.checkpoint import read_checkpoint
from lpcgma.engine.trainer import Callback, TrainResult, train
from lpcgma.tracking.offline import pending_records
from lpcgma.tracking.registry import PromotionRefused, promote
from lpcgma.tracking.runs import MLflowCallback
from lpcgma.tracking.search import on_search_end, on_search_start, trial_tags

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = [
    "train.iters=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
    "train.progress=false", "data.synthetic_tiles=4", "data.eval_max_tiles=2", "data.crop_size=64",
    "data.batch_size=2", "tracking.log_overlays=1",
]  # fmt: skip


def _runs(client: MlflowClient, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id])


def test_lpcgma_train_is_tracked(mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = tmp_path / "run"
    argv = ["train", "--config", "synthetic", *TINY, f"train.out_dir={out}", "tracking.experiment=it-train"]
    assert main(argv) == 0
    client = MlflowClient(mlflow_server.uri)
    (run,) = _runs(client, "it-train")
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.params["train.iters"] == "4" and run.data.params["model.backbone"] == "resnet18"
    assert [m.step for m in client.get_metric_history(rid, "loss/total")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(rid, "target_miou")] == [2, 4]
    files = set(all_artifacts(client, rid))
    assert {
        "config.yaml",
        "classes.json",
        "checkpoints/best/state.pt",
        "checkpoints/final/state.pt",
        "plots/confusion_matrix/step_00000004.png",
        "plots/iou/step_00000002.png",
    } <= files
    assert any(f.startswith("overlays/step_00000004/") for f in files)
    dl = Path(client.download_artifacts(rid, "", str(tmp_path / "dl")))
    state = read_checkpoint(dl / "checkpoints/final")  # weights_only
    assert state["step"] == 4
    assert load_config(dl / "config.yaml").train.iters == 4
    overlay = next((dl / "overlays/step_00000004").iterdir())
    assert Image.open(overlay).format == "PNG"


# ------------------------------------------------------------------------ search + registry
@pytest.fixture(scope="module")
def smoke_search(module_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A two-trial search tracked on a real server (parent + two child runs, summary)."""
    root = tmp_path_factory.mktemp("search")
    uri = module_server.uri
    base = synthetic_cfg(root / "base", uri, *TINY, "tracking.experiment=it-search")
    space = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    parent = on_search_start(base, "smoke", space=space)
    assert parent is not None
    trials = {}
    for i, lr in enumerate((1e-3, 3e-3)):
        cfg = synthetic_cfg(root / f"trial{i}", uri, *TINY, "tracking.experiment=it-search", f"optim.lr={lr}")
        cb = MLflowCallback(cfg, parent_run_id=parent, tags=trial_tags("smoke", f"trial{i}"))
        result = train(cfg, [cb])
        trials[f"trial{i}"] = {"run_id": cb.run_id, "result": result, "cfg": cfg}
    summary = on_search_end(base, parent)
    return {"uri": uri, "parent": parent, "trials": trials, "summary": summary, "root": root, "base": base}


def test_search_structure_and_summary(smoke_search: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(smoke_search["uri"])
    parent = smoke_search["parent"]
    runs = _runs(client, "it-search")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 2 and len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["optim.lr"] for r in children} == {"0.001", "0.003"}
    assert {r.data.tags["ray.trial_id"] for r in children} == {"trial0", "trial1"}
    files = set(all_artifacts(client, parent))
    assert {"summary/trials.parquet", "summary/trials.csv", "summary/optimization_history.png"} <= files
    summary = smoke_search["summary"]
    assert summary.best_run_id in {r.info.run_id for r in children}
    assert client.get_run(parent).data.tags["best_run_id"] == summary.best_run_id


def _tiles(cfg: Any, folder: Path) -> list[Path]:
    """Two target tiles as PNG files: one as is, one cropped to a non-square size (sliding window + pad)."""
    from lpcgma.data.build import build_datasets

    folder.mkdir(parents=True)
    data = build_datasets(cfg.data)
    a = data.target_eval[0]["image"].permute(1, 2, 0).numpy()
    b = np.concatenate([a, a], axis=1)[:100, :200]
    paths = [folder / "tile_a.png", folder / "tile_b.png"]
    Image.fromarray(a).save(paths[0])
    Image.fromarray(np.ascontiguousarray(b)).save(paths[1])
    return paths


def _fabricated_trial(client: MlflowClient, smoke: dict[str, Any], search: str, value: float, split: str | None) -> str:
    """A trial run of another search holding a real checkpoint and a chosen metric value."""
    src = smoke["trials"]["trial0"]
    exp = client.get_experiment_by_name("it-search")
    assert exp is not None
    src_run = client.get_run(src["run_id"])
    tags = {**src_run.data.tags, "search": search, "ray.trial_id": f"{search}-0"}
    tags.pop("mlflow.parentRunId", None)
    tags.pop("mlflow.runName", None)
    if split:
        tags["eval_split"] = split
    run = client.create_run(exp.experiment_id, tags=tags, run_name=f"{search}-trial")
    rid = run.info.run_id
    client.log_metric(rid, "target_miou", value / 2, step=2)
    client.log_metric(rid, "target_miou", value, step=4)
    best = src["result"].best_checkpoint
    client.log_artifacts(rid, str(best), "checkpoints/best")
    for name in ("config.yaml", "classes.json"):
        path = client.download_artifacts(src["run_id"], name, str(smoke["root"] / f"dl-{search}"))
        client.log_artifact(rid, path)
    client.set_terminated(rid, "KILLED")  # stopped by ASHA: still a candidate
    return rid


def test_promotion_aliases_refusal_force_and_predict(
    smoke_search: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = smoke_search["uri"]
    client = MlflowClient(uri)
    name = "it-model"
    first = promote("smoke", model_name=name, tracking_uri=uri)
    assert first.version == "1" and first.previous_version is None
    assert first.run_id == smoke_search["summary"].best_run_id
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    mv = client.get_model_version(name, "1")
    assert mv.tags["metric"] == "target_miou" and mv.tags["eval_split"].startswith("synthetic:urban:val")

    with pytest.raises(PromotionRefused, match="not better"):  # the same candidate again
        promote("smoke", model_name=name, tracking_uri=uri)
    base = ["promote", "--search", "smoke", "--model-name", name, "--tracking-uri", uri]
    assert main(base) == 1
    assert "not better" in capsys.readouterr().err
    assert main([*base, "--force"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version_by_alias(name, "previous").version == "1"

    better = first.value + 0.05
    _fabricated_trial(client, smoke_search, "smoke-better", better, None)
    third = promote("smoke-better", model_name=name, tracking_uri=uri)
    assert third.version == "3" and third.previous_version == "2" and abs(third.value - better) < 1e-9
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert client.get_model_version_by_alias(name, "previous").version == "2"

    _fabricated_trial(client, smoke_search, "smoke-other-split", better + 0.1, "synthetic:urban:test")
    with pytest.raises(PromotionRefused, match="evaluation split"):
        promote("smoke-other-split", model_name=name, tracking_uri=uri)

    tiles = _tiles(smoke_search["base"], tmp_path / "tiles")
    out = tmp_path / "pred"
    argv = [
        "predict",
        "--model",
        f"models:/{name}@champion",
        str(tiles[0].parent),
        "--out",
        str(out),
        "--tracking-uri",
        uri,
    ]
    assert main(argv) == 0
    palette = {
        tuple(c) for c in json.loads((smoke_search["root"] / "dl-smoke-better/classes.json").read_text())["palette"]
    }
    for tile in tiles:
        pred = Image.open(out / tile.name)
        assert pred.size == Image.open(tile).size
        colours = {tuple(c) for c in np.asarray(pred.convert("RGB")).reshape(-1, 3)}
        assert colours <= palette

    # a label-free criterion by name: its metric key and its mode (entropy: lowest wins) come from the registry
    ent_name = f"{name}-entropy"
    argv = ["promote", "--search", "smoke", "--model-name", ent_name, "--tracking-uri", uri, "--metric", "entropy"]
    assert main(argv) == 0
    mv = client.get_model_version(ent_name, "1")
    assert mv.tags["metric"] == "target_entropy" and mv.tags["mode"] == "min"
    best = {
        t["run_id"]: min(m.value for m in client.get_metric_history(t["run_id"], "target_entropy"))
        for t in smoke_search["trials"].values()
    }
    assert mv.tags["source_run_id"] == min(best, key=lambda k: best[k])
    assert float(mv.tags["metric_value"]) == min(best.values())


# -------------------------------------------------------------------- the server goes away
class _ServerSwitch(Callback):
    """Stops the tracking server at one training step and (optionally) starts it again at another."""

    def __init__(self, server: MlflowServer, stop_at: int, start_at: int | None, tracker: MLflowCallback):
        self.server, self.stop_at, self.start_at, self.tracker = server, stop_at, start_at, tracker
        self.steps_logged: list[int] = []

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        self.steps_logged.append(step)
        if step == self.stop_at:
            self.server.stop()
        if step == self.start_at:
            self.server.start()
            assert self.tracker.logger is not None
            self.tracker.logger.probe_every_s = 0.0  # catch up at the next write


def _train_with_outage(server: MlflowServer, tmp_path: Path, start_at: int | None) -> tuple[MLflowCallback, Any]:
    extra = [
        "train.iters=6",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "tracking.experiment=it-outage",
    ]
    cfg = synthetic_cfg(tmp_path / "run", server.uri, *TINY, *extra)
    tracker = MLflowCallback(cfg)
    switch = _ServerSwitch(server, stop_at=2, start_at=start_at, tracker=tracker)
    result = train(cfg, [switch, tracker])
    assert switch.steps_logged == [1, 2, 3, 4, 5, 6] and result.step == 6  # training went on
    return tracker, result


def _assert_complete(server: MlflowServer, run_id: str) -> None:
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run_id, "target_miou")] == [3, 6]
    files = set(all_artifacts(client, run_id))
    assert {
        "checkpoints/best/state.pt",
        "checkpoints/final/state.pt",
        "plots/confusion_matrix/step_00000006.png",
    } <= files


def test_server_down_mid_run_then_back_catches_up(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    tracker, _ = _train_with_outage(mlflow_server, tmp_path, start_at=4)
    assert tracker.logger is not None and not tracker.logger.offline
    assert pending_records(tmp_path / "run") == 0
    _assert_complete(mlflow_server, tracker.run_id or "")


def test_server_down_until_the_end_then_mlflow_sync(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker, _ = _train_with_outage(mlflow_server, tmp_path, start_at=None)
    assert pending_records(tmp_path / "run") > 0
    mlflow_server.start()
    assert MlflowClient(mlflow_server.uri).get_run(tracker.run_id or "").info.status == "RUNNING"
    assert main(["mlflow", "sync", "--run-dir", str(tmp_path / "run")]) == 0  # URI from the record
    assert '"pending": 0' in capsys.readouterr().out
    _assert_complete(mlflow_server, tracker.run_id or "")


# ------------------------------------------------------------------------------ S3 artifacts
def _log_fake_run(uri: str, tmp_path: Path, experiment: str) -> str:
    cfg = synthetic_cfg(tmp_path / experiment, uri, f"tracking.experiment={experiment}")
    cb = MLflowCallback(cfg)
    cb.on_train_start(fake_trainer(cfg))
    ckpt = write_fake_checkpoint(tmp_path / experiment / "checkpoints", 2, cfg)
    cb.on_eval(fake_report(2, ckpt, True))
    cb.on_train_end(TrainResult(2, tmp_path, {}, 0.2, 2, None, ckpt))
    assert cb.run_id is not None
    return cb.run_id


def test_s3_artifact_roots_on_moto(moto_s3: Any, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3.url, region_name="us-east-1")
    s3.create_bucket(Bucket="lpcgma-test")
    layouts = {
        "direct": ["--default-artifact-root", "s3://lpcgma-test/direct", "--no-serve-artifacts"],
        "proxied": ["--artifacts-destination", "s3://lpcgma-test/proxied"],
    }
    for layout, args in layouts.items():
        server = MlflowServer(tmp_path / layout, artifact_args=args).start()
        try:
            run_id = _log_fake_run(server.uri, tmp_path, f"it-s3-{layout}")
            client = MlflowClient(server.uri)
            assert client.get_run(run_id).info.status == "FINISHED"
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lpcgma-test", Prefix=layout)["Contents"]]
            assert any(k.endswith(f"{run_id}/artifacts/checkpoints/best/state.pt") for k in keys), keys
            assert any(k.endswith("plots/confusion_matrix/step_00000002.png") for k in keys)
            local = client.download_artifacts(run_id, "checkpoints/final", str(tmp_path / f"dl-{layout}"))
            assert read_checkpoint(local)["step"] == 2
        finally:
            server.stop()


# ----------------------------------------------------------------------------- server.sh
def test_server_script_binds_loopback_and_refuses_open_binding_without_auth(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/s.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
    }
    script = REPO / "mlflow" / "server.sh"
    refused = subprocess.run([str(script)], env={**env, "MLFLOW_HOST": "0.0.0.0"}, capture_output=True, text=True)
    assert refused.returncode == 2 and "refusing to bind" in refused.stderr
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening.strip():  # iproute2 present: the socket is bound to loopback only
            assert all("127.0.0.1:" in line for line in listening.strip().splitlines()), listening
    finally:
        stop_process(proc)
    assert (tmp_path / "s.db").is_file() and not (REPO / "mlflow" / "__init__.py").exists()
