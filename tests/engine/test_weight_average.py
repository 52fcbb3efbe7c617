"""Weight averaging (train.eval_ema): an exponential moving average of the student's weights is what
is evaluated, saved as the model, promoted and warm-started from; training itself is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_label_free_training import tiny
from test_precise_bn import assert_same, bn_buffers

from lpcgma.config import ConfigError
from lpcgma.engine.checkpoint import read_checkpoint
from lpcgma.engine.source_stage import source_key
from lpcgma.engine.trainer import Trainer
from lpcgma.methods.base import model_weights
from lpcgma.models.batchnorm import recompute_bn_stats
from lpcgma.tracking.registry import build_predictor


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]


def test_the_average_follows_the_ema_rule_and_leaves_training_unchanged(tmp_path: Path) -> None:
    plain = Trainer(tiny(tmp_path / "plain", "method.name=self_training"))
    plain.fit()
    averaged = Trainer(tiny(tmp_path / "avg", "method.name=self_training", "train.eval_ema=0.5"))
    average = averaged.method.average
    assert plain.method.average is None and average is not None
    start = [p.clone() for p in averaged.method.student.parameters()]
    averaged.fit()
    assert losses(tmp_path / "plain" / "run") == losses(tmp_path / "avg" / "run")  # the same training
    for a, b in zip(plain.method.student.parameters(), averaged.method.student.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # after 4 averaged steps the average is neither the start nor the last student
    moved = [
        (s0, s1, a)
        for s0, s1, a in zip(start, averaged.method.student.parameters(), average.net.parameters(), strict=True)
        if not torch.allclose(s0, s1)
    ]
    assert moved
    assert any(not torch.allclose(a, s1) and not torch.allclose(a, s0) for s0, s1, a in moved)


def test_one_update_is_the_ema_of_the_students_weights(tmp_path: Path) -> None:
    trainer = Trainer(tiny(tmp_path, "method.name=source_only", "train.eval_ema=0.9"))
    method, average = trainer.method, trainer.method.average
    assert average is not None
    before = [p.clone() for p in average.net.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(100)  # momentum min(0.9, 101/110) = 0.9
    for b, s, a in zip(before, method.student.parameters(), average.net.parameters(), strict=True):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * s)


def test_evaluation_and_precise_bn_use_the_average(tmp_path: Path) -> None:
    trainer = Trainer(tiny(tmp_path, "method.name=self_training", "train.eval_ema=0.9", "train.precise_bn_batches=2"))
    average = trainer.method.average
    assert average is not None and trainer.method.eval_net is average.net
    src, tgt = trainer.streams()
    for _ in range(2):
        trainer.run_step(next(src), next(tgt))
    assert trainer.evaluator.precise_bn() == 4
    recomputed = bn_buffers(average.net)
    assert any(not torch.allclose(a, b) for a, b in zip(recomputed, bn_buffers(trainer.method.student), strict=True))
    iterators = [stream.batches(0) for stream in trainer.evaluator.precise_bn_streams]
    images = (next(it)["image"] for _ in range(2) for it in iterators)
    recompute_bn_stats(average.net, images)  # the same fixed batches give the same statistics
    assert_same(bn_buffers(average.net), recomputed)
    x = torch.randn(1, 3, 64, 64)
    trainer.method.eval()
    with torch.no_grad():
        expected = average.net(x)["logits"]
        got = trainer.evaluator.predict(x)
    assert got.shape[-2:] == (64, 64)
    assert not torch.allclose(got, trainer.evaluator.predict(x, trainer.method.student))
    torch.testing.assert_close(torch.nn.functional.interpolate(expected, (64, 64), mode="bilinear"), got)


def test_the_checkpoint_model_is_the_average_for_promotion_and_warm_starts(tmp_path: Path) -> None:
    result = Trainer(tiny(tmp_path / "a", "method.name=source_only", "train.eval_ema=0.9")).fit()
    assert result.last_checkpoint is not None
    state = read_checkpoint(result.last_checkpoint)
    method_state = state["method"]
    average = {k.removeprefix("average.net."): v for k, v in method_state.items() if k.startswith("average.net.")}
    student = {k.removeprefix("student."): v for k, v in method_state.items() if k.startswith("student.")}
    weights = model_weights(method_state)
    assert weights.keys() == average.keys() == student.keys()
    assert all(weights[k] is average[k] for k in weights)
    assert model_weights({f"student.{k}": v for k, v in student.items()}).keys() == student.keys()
    # promotion builds its predictor from the average
    cfg = tiny(tmp_path / "a", "method.name=source_only", "train.eval_ema=0.9")
    predictor = build_predictor(cfg, state, 7)
    for k, v in predictor.state_dict().items():
        torch.testing.assert_close(v, average[k.removeprefix("model.")])
    # a warm start (model.init_checkpoint) starts the student, teacher and average from it
    warm = Trainer(tiny(tmp_path / "b", "method.name=self_training", f"model.init_checkpoint={result.last_checkpoint}"))
    warm.maybe_resume(None)  # a fresh run: the warm start
    assert warm.method.teacher is not None
    for net in (warm.method.student, warm.method.teacher.net):
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, average[k], msg=k)


def test_eval_ema_is_validated_and_does_not_change_the_source_model_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.eval_ema"):
        tiny(tmp_path, "train.eval_ema=1.0")
    plain = tiny(tmp_path, "source_stage.enabled=true")
    averaged = tiny(tmp_path, "source_stage.enabled=true", "train.eval_ema=0.99")
    assert source_key(plain) == source_key(averaged)  # the source stage keeps no average
