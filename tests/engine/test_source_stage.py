"""The shared source stage: content addressing, the cache (hit, miss, partial, corrupt, concurrent
askers, S3), warm starts from it, and refusal of a checkpoint of another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from server_helpers import MotoServer
from tiny_config import tiny_overrides

from lpcgma.config import ConfigError, load_config, replace
from lpcgma.engine.checkpoint import STATE_FILE, read_checkpoint
from lpcgma.engine.processes import map_in_processes
from lpcgma.engine.source_stage import (
    MANIFEST_FILE,
    MODEL_DIR,
    SourceModelError,
    ensure_source_model,
    evaluate_source_model,
    source_key,
    source_settings,
    stage_config,
)
from lpcgma.engine.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"
TINY = tiny_overrides(
    "train.precise_bn_batches=1",
    "train.label_free_tiles=1",
    "train.source_eval_tiles=1",
    "train.progress=false",
    "tracking.enabled=false",
    "source_stage.enabled=true",  # these two last: a test drops them
    "source_stage.iters=2",
    tiles=2, tile_size=32, crop=32, batch=1, window=32,
)  # fmt: skip


def tiny(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    return load_config(CONFIG, [*TINY, f"train.out_dir={tmp_path / 'run'}", f"source_stage.store={store}", *extra])


def test_key_follows_the_source_settings_only(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)
    same = {
        "data.synthetic_shift": 0.4,
        "data.synthetic_target_sensor": "rgb",
        "train.eval_window": 48,
        "train.iters": 50,
        "optim.warmup_iters": 7,  # the adaptation's optimiser; the stage has source_stage.optim
        "optim.lr": 0.01,
        "optim.name": "sgd",
        "data.rcs_temperature": 0.5,  # the stage samples tiles uniformly
        "data.rcs_enabled": True,
        "method": {"name": "lpcgma", "tau_pmc": 0.3},
        "tracking.experiment": "other",
        "source_stage.store": str(tmp_path / "elsewhere"),
    }
    for key, value in same.items():
        assert source_key(replace(cfg, {key: value})) == source_key(cfg), key
    other = {
        "train.seed": 1,
        "source_stage.iters": 3,
        "source_stage.optim.lr": 0.01,
        "source_stage.optim.weight_decay": 0.05,
        "source_stage.projection_contrast": 0.1,
        "data.crop_size": 24,
        "model.proj_dim": 16,
        "data.synthetic_seed": 4,
        "train.precise_bn_batches": 2,
        "data.source_blur_prob": 0.5,  # texture augmentation of the source crops
        "data.source_noise_prob": 0.5,
    }
    keys = {name: source_key(replace(cfg, {name: value})) for name, value in other.items()}
    assert source_key(cfg) not in keys.values() and len(set(keys.values())) == len(keys)


def test_keys_added_later_leave_older_source_models_their_key(tmp_path: Path) -> None:
    """A key added after models were cached enters the hash only when set away from its default."""
    cfg = tiny(tmp_path)
    assert "data.source_blur_prob" not in source_settings(cfg)
    noisy = replace(cfg, {"data.source_noise_prob": 0.3})
    assert source_settings(noisy)["data.source_noise_prob"] == 0.3 and source_key(noisy) != source_key(cfg)


def test_stage_config_is_source_only_with_the_stage_settings(tmp_path: Path) -> None:
    stage_keys = ["source_stage.optim.lr=0.003", "source_stage.optim.name=sgd", "source_stage.projection_contrast=0.2"]
    cfg = tiny(tmp_path, "method.name=lpcgma", "optim.lr=0.0002", "data.rcs_enabled=true", *stage_keys)
    stage = stage_config(cfg)
    assert stage.method.name == "source_only" and stage.method.lambda_proj == 0.2  # type: ignore[attr-defined]
    assert (stage.train.iters, stage.optim.lr, stage.optim.name) == (2, 0.003, "sgd")
    assert not stage.source_stage.enabled and not stage.data.rcs_enabled


def test_searched_keys_that_would_change_the_source_model_are_refused(tmp_path: Path) -> None:
    from lpcgma.engine.source_stage import check_searchable, searched_source_keys

    cfg = tiny(tmp_path)
    adaptation = ["optim.lr", "method.tau_pmc", "data.rcs_temperature", "model.ema_momentum"]
    assert searched_source_keys(cfg, adaptation) == []
    bad = ["data.crop_size", "source_stage.iters", "model.proj_dim"]
    assert searched_source_keys(cfg, [*adaptation, *bad]) == bad
    with pytest.raises(ConfigError, match=r"data.crop_size.*shared source model"):
        check_searchable(cfg, ["optim.lr", "data.crop_size"])
    check_searchable(replace(cfg, {"source_stage.enabled": False}), bad)  # no source stage: anything goes


def test_miss_trains_once_then_hits(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)
    logs: list[str] = []
    torch.manual_seed(5)
    first = ensure_source_model(cfg, log=logs.append)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)  # the caller's generators are as they were
    assert first.trained and any("training source model" in line for line in logs)
    manifest = json.loads((Path(first.uri) / MANIFEST_FILE).read_text())
    assert manifest["key"] == first.key == source_key(cfg) and manifest["settings"]["train.seed"] == 0
    assert 0.0 <= manifest["metrics"]["target_miou"] <= 1.0
    assert manifest["trained_with"] == {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    second = ensure_source_model(cfg, log=logs.append)
    assert not second.trained and second.checkpoint == first.checkpoint and len(logs) == 1
    state = read_checkpoint(second.checkpoint)
    assert state["method_name"] == "source_only" and state["step"] == 2 and "optimizer" not in state
    # the stage's run keeps its logs and best model, not its resumable step checkpoints
    assert [p.name for p in (Path(first.uri) / "run" / "checkpoints").iterdir()] == ["best"]


@pytest.mark.parametrize("damage", ["corrupt", "partial", "foreign"])
def test_partial_or_corrupt_models_are_retrained_never_used(tmp_path: Path, damage: str) -> None:
    cfg = tiny(tmp_path)
    model = ensure_source_model(cfg, log=lambda _: None)
    folder = Path(model.uri)
    if damage == "corrupt":
        state = folder / MODEL_DIR / STATE_FILE
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "partial":  # an interrupted stage: a model folder, no manifest
        (folder / MANIFEST_FILE).unlink()
    else:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "key": "0" * 16}))
    logs: list[str] = []
    again = ensure_source_model(cfg, log=logs.append)
    assert again.trained and any("training source model" in line for line in logs)
    assert read_checkpoint(again.checkpoint)["step"] == 2


def _ask(cfg_yaml: str, out: str) -> bool:
    from lpcgma.config import load_config

    path = Path(out) / "cfg.yaml"
    path.write_text(cfg_yaml)
    return ensure_source_model(load_config(path), log=lambda _: None).trained


def test_concurrent_askers_train_exactly_once(tmp_path: Path) -> None:
    from lpcgma.config import dump_config

    cfg = tiny(tmp_path)
    calls = []
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        calls.append((dump_config(cfg), str(tmp_path / f"p{i}")))
    trained = list(map_in_processes(_ask, calls, jobs=2))
    assert sorted(trained) == [False, True]


def test_training_without_permission_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceModelError, match="no valid source model"):
        ensure_source_model(tiny(tmp_path), allow_training=False)


def test_trainer_starts_from_the_shared_source_model(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "method.name=self_training")
    trainer = Trainer(cfg)
    trainer.maybe_resume(None)  # a fresh run: obtains the source model and warm-starts
    model = ensure_source_model(cfg, log=lambda _: None)
    stored = read_checkpoint(model.checkpoint)["method"]
    for name, value in trainer.method.student.state_dict().items():
        assert torch.equal(value, stored[f"student.{name}"]), name
    assert trainer.method.teacher is not None
    teacher_weight = trainer.method.teacher.net.classifier.branches[0].weight
    assert torch.equal(teacher_weight, stored["student.classifier.branches.0.weight"])
    metrics = evaluate_source_model(replace(cfg, {"data.synthetic_shift": 0.0}), model)
    assert 0.0 <= metrics["target_miou"] <= 1.0 and "source_miou" in metrics


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    model = ensure_source_model(tiny(tmp_path), log=lambda _: None)
    other = load_config(CONFIG, [*TINY[:-2], f"train.out_dir={tmp_path / 'b'}", "model.proj_dim=16",
                                 f"model.init_checkpoint={model.checkpoint}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.proj_dim=8.*model.proj_dim=16"):
        Trainer(other).fit()


def test_init_checkpoint_and_source_stage_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        tiny(tmp_path, "model.init_checkpoint=/some/run/checkpoints/best")


def test_projection_contrast_trains_the_head_only(tmp_path: Path) -> None:
    """With source_stage.projection_contrast the segmenter's weights are those of plain source-only."""
    plain = ensure_source_model(tiny(tmp_path / "a"), log=lambda _: None)
    contrast = ensure_source_model(tiny(tmp_path / "b", "source_stage.projection_contrast=0.5"), log=lambda _: None)
    a, b = (read_checkpoint(m.checkpoint)["method"] for m in (plain, contrast))
    assert torch.equal(a["student.layer1.0.conv1.weight"], b["student.layer1.0.conv1.weight"])
    assert torch.equal(a["student.classifier.branches.0.weight"], b["student.classifier.branches.0.weight"])
    assert not torch.equal(a["student.projector.net.0.weight"], b["student.projector.net.0.weight"])


@pytest.mark.slow  # a real moto server
def test_s3_store_trains_once_and_downloads_a_checked_copy(tmp_path: Path, moto_s3: MotoServer) -> None:
    import boto3

    cfg = tiny(tmp_path, "source_stage.store=s3://lpcgma-shards/source-models")
    first = ensure_source_model(cfg, log=lambda _: None)
    assert first.trained and first.uri == f"s3://lpcgma-shards/source-models/{first.key}"
    s3 = boto3.client("s3", endpoint_url=moto_s3.url)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lpcgma-shards")["Contents"]}
    assert {f"source-models/{first.key}/{n}" for n in (MANIFEST_FILE, "model/state.pt", "model/config.yaml")} <= keys
    first.checkpoint.joinpath(STATE_FILE).unlink()  # the local cache is gone: downloaded again
    second = ensure_source_model(cfg, log=lambda _: None)
    assert not second.trained and second.checkpoint.joinpath(STATE_FILE).is_file()
    s3.put_object(Bucket="lpcgma-shards", Key=f"source-models/{first.key}/model/state.pt", Body=b"garbage")
    second.checkpoint.joinpath(STATE_FILE).unlink()
    assert ensure_source_model(cfg, log=lambda _: None).trained  # corrupt remote model: retrained
