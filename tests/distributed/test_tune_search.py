"""Real searches on a local Ray cluster (slow): single-worker trials inline, a 2-worker TorchTrainer
trial, and the MLflow hooks (parent run + child runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lpcgma.data.synthetic import write_synthetic_loveda
from lpcgma.distributed.search import run_search
from lpcgma.distributed.search_mlflow import mlflow_hooks
from lpcgma.distributed.search_types import SearchSettings
from lpcgma.engine.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


def smoke(tmp: Path, **kw: object) -> SearchSettings:
    base: dict[str, object] = dict(
        config="synthetic",
        search_space="smoke",
        smoke_test=True,
        num_samples=3,
        storage=str(tmp / "store"),
        name="smoke",
        overrides=["tracking.enabled=false"],
        verbose=0,
    )
    base.update(kw)
    return SearchSettings(**base)  # type: ignore[arg-type]


def test_smoke_search_single_worker_trials_inline(ray_tmp: Path) -> None:
    outcome = run_search(smoke(ray_tmp))
    assert outcome.complete and len(outcome.trials) == 3
    assert all(t.status in ("finished", "stopped early") for t in outcome.trials)
    assert all(t.best is not None and 0.0 <= t.best <= 1.0 for t in outcome.trials)
    dflt = outcome.defaults
    assert dflt is not None and dflt.params == {"optim.lr": 0.001, "optim.head_lr_mult": 10.0}
    for t in outcome.trials:
        # the trainer's run folder is inside the trial's own folder; the checkpoint Tune kept is a trainer checkpoint
        assert t.out_dir and Path(t.out_dir).parent.parent == ray_tmp / "store" / "smoke"
        assert (Path(t.out_dir) / "metrics.jsonl").is_file() and (Path(t.out_dir) / "config.yaml").is_file()
        assert t.checkpoint and (Path(t.checkpoint) / "state.pt").is_file()
        # the resumable state is Ray's copy alone; the run folder keeps the model (checkpoints/best)
        assert "optimizer" in read_checkpoint(t.checkpoint)
        assert [p.name for p in (Path(t.out_dir) / "checkpoints").iterdir()] == ["best"]
        rows = [json.loads(line) for line in (Path(t.out_dir).parent / "result.json").read_text().splitlines()]
        assert all("target_miou" in r and "node_id" in r for r in rows)
        assert [r["step"] for r in rows] == [2, 4][: len(rows)]
    saved = json.loads((ray_tmp / "store" / "smoke" / "lpcgma_search.json").read_text())
    assert saved["defaults"] == dflt.params and saved["base"]["train.iters"] == 4
    assert "best trial" in outcome.format() or "literature defaults" in outcome.format()


def test_two_worker_torchtrainer_trial(ray_tmp: Path) -> None:
    outcome = run_search(smoke(ray_tmp, num_samples=1, workers_per_trial=2, name="ddp"))
    (trial,) = outcome.trials
    assert trial.status == "finished" and trial.best is not None
    assert trial.checkpoint and "train_runs/train-" in trial.checkpoint
    assert (Path(trial.checkpoint) / "state.pt").is_file()
    assert [p.name for p in (Path(trial.out_dir) / "checkpoints").iterdir()] == ["best"]  # type: ignore[arg-type]
    rows = [json.loads(x) for x in (Path(trial.out_dir).parent / "result.json").read_text().splitlines()]  # type: ignore[arg-type]
    assert [r["step"] for r in rows] == [2, 4] and all("target_miou" in r for r in rows)


def test_a_reported_checkpoint_moves_to_ray(ray_tmp: Path) -> None:
    """`report_to_tune` deletes the run folder's step checkpoint once Ray holds its copy, in the report
    itself (the search's end sweeps what a stopped trial left, so this checks the report alone)."""
    import ray
    from ray import tune

    from lpcgma.distributed.train import report_to_tune

    def trainable(config: dict[str, str]) -> None:
        folder = Path(config["run"]) / "step_00000001"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"state")
        report_to_tune({"score": 1.0}, folder)
        (Path(config["run"]) / "after_report.txt").write_text(str(folder.exists()))

    ray.init(num_cpus=1, _temp_dir=str(ray_tmp / "ray"), include_dashboard=False)
    run = ray_tmp / "run"
    tuner = tune.Tuner(
        trainable,
        param_space={"run": str(run)},
        run_config=tune.RunConfig(storage_path=str(ray_tmp / "store"), name="moved", verbose=0),
    )
    (result,) = tuner.fit()
    assert result.error is None and (run / "after_report.txt").read_text() == "False"
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "state.pt").read_bytes() == b"state"


def test_search_with_mlflow_parent_and_child_runs(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ray_tmp}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = smoke(ray_tmp, num_samples=2, name="tracked", overrides=["tracking.log_overlays=0"])
    outcome = run_search(settings, *mlflow_hooks())
    assert outcome.complete and len(outcome.trials) == 2
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("lpcgma.role") == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    assert {r.data.tags.get("search") for r in children} == {"tracked"}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)


def test_label_free_search_on_a_target_without_masks(ray_tmp: Path) -> None:
    root = write_synthetic_loveda(ray_tmp / "loveda", num_tiles=3, tile_size=64)
    for split in ("Train", "Val"):
        shutil.rmtree(root / split / "Urban" / "masks_png")  # the target has no labels at all
    data = ["data.dataset=loveda", f"data.root={root}", "data.target_labels=false", "train.label_free_tiles=2"]
    settings = smoke(
        ray_tmp, num_samples=2, name="label_free", objective="snd", overrides=["tracking.enabled=false", *data]
    )
    outcome = run_search(settings)
    assert outcome.complete and (outcome.objective, outcome.mode) == ("target_snd", "max")
    assert all(t.status != "error" and t.best is not None for t in outcome.trials)
    for t in outcome.trials:
        rows = [json.loads(x) for x in (Path(t.out_dir).parent / "result.json").read_text().splitlines()]  # type: ignore[arg-type]
        assert all("target_snd" in r and "source_miou" in r and "target_miou" not in r for r in rows)
        assert t.checkpoint and (Path(t.checkpoint) / "state.pt").is_file()
        assert (Path(t.out_dir) / "checkpoints" / "best" / "state.pt").is_file()  # type: ignore[arg-type]


def test_trials_start_from_one_shared_source_model(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two searches with the same source settings: the first trains the source model once (its own
    MLflow run, linked from the parent run), every trial of both starts from it, the second reuses it."""
    from mlflow.tracking import MlflowClient

    from lpcgma.engine.source_stage import MANIFEST_FILE

    uri = f"sqlite:///{ray_tmp}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    stage = ["tracking.log_overlays=0", "source_stage.enabled=true", "source_stage.iters=2"]
    first = run_search(smoke(ray_tmp, num_samples=2, name="from_source", overrides=stage), *mlflow_hooks())
    assert first.complete and first.source_model is not None and first.source_model["trained"]
    key = first.source_model["key"]
    models = [p for p in (ray_tmp / "store" / "source_models").iterdir() if p.is_dir()]
    assert [p.name for p in models] == [key] and (models[0] / MANIFEST_FILE).is_file()
    assert f"source-only (shared source model {key})" in first.format()
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (source_run,) = [r for r in runs if r.data.tags.get("lpcgma.role") == "source_model"]
    assert source_run.data.tags["lpcgma.source_model"] == key and source_run.info.status == "FINISHED"
    (parent,) = [r for r in runs if r.data.tags.get("lpcgma.role") == "search"]
    assert parent.data.tags["source_model.run_id"] == source_run.info.run_id
    reported = first.source_model["metrics"]["target_miou"]
    assert parent.data.metrics["source_model/target_miou"] == pytest.approx(reported)
    trials = [r for r in runs if r.data.tags.get("lpcgma.role") == "trial"]
    assert len(trials) == 2 and all(r.data.tags["lpcgma.source_model"] == key for r in trials)

    second = run_search(smoke(ray_tmp, num_samples=1, name="again", overrides=[*stage, "optim.lr=0.002"]))
    assert second.source_model is not None and second.source_model["key"] == key
    assert not second.source_model["trained"]  # found in the store: not trained again
