"""SDCA's final self-training round on offline pseudo-labels, through the real trainer (tiny sizes)."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_methods_train import _CrashAfter  # the same "killed after step N" callback
from tiny_config import tiny_overrides

from lpcgma.config import ConfigError, ExperimentConfig, load_config
from lpcgma.data.stream import TrainStream
from lpcgma.data.transforms import TrainTransform
from lpcgma.engine.trainer import OfflineTargetLabelling, Trainer
from lpcgma.methods.sdca import SDCA

CONFIG = Path(__file__).resolve().parents[2] / "lpcgma" / "configs" / "synthetic.yaml"
TINY = tiny_overrides("tracking.enabled=false")  # ROUND sets the steps
# 8 steps; the round is the last 4 (steps 4..7); checkpoints at 3, 6 and 8: 6 is inside the round
ROUND = [
    "method.name=sdca",
    "method.sdca_init_batches=1",
    "train.iters=8",
    "method.final_st_iters=4",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "train.log_every=2",
]


def tiny_config(tmp_path: Path, *extra: str) -> ExperimentConfig:
    return load_config(CONFIG, [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


def _records(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.final_st_iters=8", "method.final_st_iters"),  # = train.iters: no SDCA adaptation left
        ("method.final_st_iters=-1", "method.final_st_iters"),
        ("method.final_st_threshold_cap=1.5", "method.final_st_threshold_cap"),
        ("method.final_st_source_weight=-0.5", "method.final_st_source_weight"),
    ],
)
def test_bad_round_settings_are_refused_with_the_key_named(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path, *ROUND, override)


def test_without_the_round_the_state_keeps_its_keys(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "method.name=sdca"))
    assert trainer._offline_labels_from() is None
    assert not any(k.startswith("final_st") for k in trainer.method.state_dict())
    with_round = Trainer(tiny_config(tmp_path, *ROUND))
    assert isinstance(with_round.method, OfflineTargetLabelling) and with_round._offline_labels_from() == 4
    keys = set(with_round.method.state_dict())
    assert {"final_st_started", "final_st_thresholds", "final_st_kept"} <= keys
    assert any(k.startswith("final_st_labeller.") for k in keys)
    assert keys - {k for k in keys if k.startswith("final_st")} == set(trainer.method.state_dict())


def test_the_round_refuses_to_train_without_offline_labels(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, *ROUND))
    src, tgt = trainer.streams()
    assert isinstance(trainer.method, SDCA)
    trainer.method.train_step(next(src), next(tgt), step=3)  # SDCA adaptation: fine
    with pytest.raises(RuntimeError, match="offline target pseudo-labels"):
        trainer.method.train_step(next(src), next(tgt), step=4)


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_the_round_weighs_source_ce_by_final_st_source_weight(tmp_path: Path, weight: float) -> None:
    trainer = Trainer(tiny_config(tmp_path, *ROUND, f"method.final_st_source_weight={weight}"))
    method = trainer.method
    assert isinstance(method, SDCA)
    method._final_st_labelled = True  # as after make_offline_labels; the target masks stand in for labels
    src, tgt = trainer.streams()
    source, target = next(src), next(tgt)
    out = method.train_step(source, target, step=4)
    assert "loss/sdca_target" not in out.logs and ("loss/source_ce" in out.logs) == (weight > 0)
    expected = out.logs["loss/final_st_target"] + weight * out.logs.get("loss/source_ce", torch.tensor(0.0))
    torch.testing.assert_close(out.loss.detach(), expected)


def test_served_labels_are_cropped_and_flipped_with_their_images(tmp_path: Path) -> None:
    """The offline labels replace the tile masks before augmentation: serving each tile's own mask
    (as uint8, the stored dtype) as its 'offline label' gives exactly the batches of the plain stream."""
    trainer = Trainer(tiny_config(tmp_path, *ROUND))
    tiles = trainer.data.target_train
    d = trainer.cfg.data
    transform = TrainTransform(d.crop_size, d.scale_range, d.hflip, d.photometric, trainer.data.mean, trainer.data.std)
    plain = TrainStream(tiles, transform, d.batch_size, seed=trainer.cfg.train.seed * 2 + 2).batches(5)  # type: ignore[arg-type]
    trainer.offline_masks.update({i: tiles[i]["mask"].to(torch.uint8) for i in range(len(tiles))})  # type: ignore[arg-type]
    served = trainer.train_streams[1].batches(5)
    for _ in range(3):
        a, b = next(plain), next(served)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert b["mask"].dtype == torch.int64


# ------------------------------------------------------------------------------------ end to end
def test_round_runs_and_resume_inside_it_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # the uninterrupted run crosses the round's start with a loader worker process: the labels made
    # then must reach the (restarted) worker, else it would train on other masks and differ below
    full = Trainer(tiny_config(tmp_path / "a", *ROUND, "data.num_workers=1")).fit()
    records = _records(tmp_path / "a" / "run")
    train_logs = {int(r["step"]): r for r in records if "loss/total" in r}
    assert "loss/sdca_target" in train_logs[4] and "loss/final_st_target" not in train_logs[4]  # steps 0..3
    for step in (6, 8):  # steps 4..7: the round
        logs = train_logs[step]
        assert "loss/sdca_target" not in logs and math.isfinite(logs["loss/final_st_target"])
        assert 0.0 < logs["pseudo/final_st_kept"] <= 1.0 and 0.0 <= logs["pseudo/final_st_labelled_frac"] <= 1.0
    final = full.final_metrics
    assert final["diag/final_st_kept"] == pytest.approx(train_logs[8]["pseudo/final_st_kept"])
    thresholds = [v for k, v in final.items() if k.startswith("diag/final_st_threshold/")]
    assert thresholds and all(0.0 < v <= 0.9 + 1e-6 for v in thresholds)  # capped at 0.9

    with pytest.raises(KeyboardInterrupt):  # stops after the checkpoint of step 6, inside the round
        Trainer(tiny_config(tmp_path / "b", *ROUND), [_CrashAfter(6)]).fit()
    resumed_trainer = Trainer(tiny_config(tmp_path / "b", *ROUND))
    resumed = resumed_trainer.fit()
    assert resumed_trainer.offline_masks  # made again on resume, from the checkpointed labeller
    assert full.last_checkpoint is not None and resumed.last_checkpoint is not None
    sa = torch.load(full.last_checkpoint / "state.pt", weights_only=True)["method"]
    sb = torch.load(resumed.last_checkpoint / "state.pt", weights_only=True)["method"]
    assert set(sa) == set(sb) and bool(sa["final_st_started"])
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    assert resumed.final_metrics["target_miou"] == pytest.approx(full.final_metrics["target_miou"], abs=1e-6)

    # the labels: each tile's whole-tile prediction of the labeller, class ids or 255, never all ignored
    masks = resumed_trainer.offline_masks
    tiles = resumed_trainer.data.target_train
    assert sorted(masks) == list(range(len(tiles)))  # type: ignore[arg-type]
    for i, y in masks.items():
        assert y.dtype == torch.uint8 and y.shape == tiles[i]["mask"].shape
        assert set(y.unique().tolist()) <= {*range(len(resumed_trainer.class_names)), 255}
    assert any((y != 255).any() for y in masks.values()) and any((y == 255).any() for y in masks.values())


# ------------------------------------------------------------------------------------ two ranks
def _rank_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(tiny_config(Path(root), *ROUND))
        trainer.fit()
        state = {f"method.{k}": v for k, v in trainer.method.state_dict().items()}
        state.update({f"mask.{i}": y for i, y in trainer.offline_masks.items()})
        torch.save(state, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two gloo processes that each train the tiny run (~30-60 s here)
def test_two_ranks_label_their_shards_with_the_thresholds_of_all_tiles(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in (k for k in s0 if k.startswith("method.")):  # one model, one labeller, one set of thresholds
        if k.startswith("method.student.") and ".running_" in k:
            continue  # ranks keep their own BatchNorm statistics (no SyncBN); the labeller has rank 0's
        assert torch.equal(s0[k], s1[k]), k
    assert sorted(k for k in s0 if k.startswith("mask.")) == ["mask.0", "mask.2"]  # rank 0: tiles i % 2 == 0
    assert sorted(k for k in s1 if k.startswith("mask.")) == ["mask.1", "mask.3"]

    # one process labelling every tile with the same labeller finds the same thresholds and labels
    single = Trainer(tiny_config(tmp_path / "single", *ROUND))
    single.method.load_state_dict({k.removeprefix("method."): v for k, v in s0.items() if k.startswith("method.")})
    single._make_offline_target_labels()
    assert isinstance(single.method, SDCA)
    assert torch.equal(single.method.final_st_thresholds, s0["method.final_st_thresholds"])
    assert torch.equal(single.method.final_st_kept, s0["method.final_st_kept"])
    for i, y in single.offline_masks.items():
        assert torch.equal(y, (s0 if i % 2 == 0 else s1)[f"mask.{i}"]), i
