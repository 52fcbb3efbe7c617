"""The trainer's precise BN (train.precise_bn_batches): evaluations see BatchNorm statistics of fixed
batches, not of whichever training batches came last, and training itself is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_label_free_training import tiny

from lpcgma.engine.trainer import Trainer
from lpcgma.models.batchnorm import batchnorm_layers


def bn_buffers(net: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for layer in batchnorm_layers(net) for b in (layer.running_mean, layer.running_var)]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_the_teacher_gets_the_students_recomputed_statistics(tmp_path: Path) -> None:
    trainer = Trainer(tiny(tmp_path, "method.name=self_training", "train.precise_bn_batches=2"))
    teacher = trainer.method.teacher
    assert teacher is not None
    src, tgt = trainer.streams()
    trainer.run_step(next(src), next(tgt))
    stale = bn_buffers(teacher.net)
    assert trainer.evaluator.precise_bn() == 4  # 2 batches of each domain the student trains on
    recomputed = bn_buffers(trainer.method.student)
    assert_same(bn_buffers(teacher.net), recomputed)  # the teacher predicts with the same statistics
    assert any(not torch.allclose(a, b) for a, b in zip(stale, recomputed, strict=True))


def test_the_same_weights_evaluate_the_same_after_different_histories(tmp_path: Path) -> None:
    trainer = Trainer(tiny(tmp_path, "method.name=source_only", "train.precise_bn_batches=2"))
    assert trainer.evaluator.precise_bn() == 2  # source only: the student never sees a target image
    before, _, _ = trainer.evaluator.evaluate()
    student = trainer.method.student
    student.train()
    with torch.no_grad():  # other batches move the running statistics, not the weights
        for _ in range(3):
            student(torch.randn(2, 3, 48, 48) * 2 + 1)
    moved, _, _ = trainer.evaluator.evaluate()
    trainer.evaluator.precise_bn()
    after, _, _ = trainer.evaluator.evaluate()
    assert moved["source_miou"] != before["source_miou"] or moved["target_miou"] != before["target_miou"]
    assert after["source_miou"] == before["source_miou"] and after["target_miou"] == before["target_miou"]


def test_training_is_unchanged_and_off_means_the_running_averages(tmp_path: Path) -> None:
    def run(name: str, *extra: str) -> tuple[list[dict[str, float]], Trainer]:
        trainer = Trainer(tiny(tmp_path / name, "method.name=source_only", *extra))
        trainer.fit()
        rows = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        return rows, trainer

    on, trainer_on = run("on", "train.precise_bn_batches=2")
    off, trainer_off = run("off", "train.precise_bn_batches=0")
    assert trainer_off.evaluator.precise_bn() == 0
    losses = [[r["loss/total"] for r in rows if "loss/total" in r] for rows in (on, off)]
    assert losses[0] == losses[1] and len(losses[0]) == 2  # the same training batches and weights
    for a, b in zip(trainer_on.method.student.parameters(), trainer_off.method.student.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # only the BatchNorm statistics differ (the checkpoints hold the recomputed ones)
    stats_on, stats_off = bn_buffers(trainer_on.method.student), bn_buffers(trainer_off.method.student)
    assert any(not torch.allclose(a, b) for a, b in zip(stats_on, stats_off, strict=True))


def test_a_checkpoint_scores_the_same_without_a_trainer(tmp_path: Path) -> None:
    """`evaluate_checkpoint` (lpcgma evaluate, the source stage's score) builds the method alone and
    gives exactly the metrics the trainer's evaluator gave the same weights."""
    from lpcgma.engine.checkpoint import read_checkpoint
    from lpcgma.engine.evaluator import evaluate_checkpoint

    cfg = tiny(tmp_path, "method.name=self_training", "train.precise_bn_batches=2")
    result = Trainer(cfg).fit()
    assert result.last_checkpoint is not None
    metrics, confusion, _ = evaluate_checkpoint(cfg, read_checkpoint(result.last_checkpoint)["method"])
    assert confusion is not None and int(confusion.sum()) > 0
    assert metrics["target_miou"] == result.final_metrics["target_miou"]
    assert metrics["target_entropy"] == result.final_metrics["target_entropy"]
    assert metrics["source_miou"] == result.final_metrics["source_miou"]
