"""The trainer's speed options (`train.channels_last`, `train.compile`, `train.amp_dtype`) change how a
step runs, not what it computes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_methods_train import METHOD_EXTRAS, tiny_config

from lpcgma.config import ConfigError
from lpcgma.engine.trainer import Trainer


def first_steps(tmp_path: Path, *extra: str, steps: int = 2) -> tuple[Trainer, list[float]]:
    """An LPCGMA trainer and its first `steps` total losses (every term on from step 0)."""
    cfg = tiny_config(tmp_path, "method.name=lpcgma", *METHOD_EXTRAS["lpcgma"], "method.gmm_warmup_iters=0", *extra)
    trainer = Trainer(cfg)
    src, tgt = trainer.streams()
    losses = []
    for _ in range(steps):
        logs = trainer.run_step(next(src), next(tgt))
        losses.append(float(logs["loss/total"]))
        trainer.step += 1
    return trainer, losses


def test_channels_last_converts_the_networks_and_gives_the_same_losses(tmp_path: Path) -> None:
    _, reference = first_steps(tmp_path / "nchw")
    trainer, losses = first_steps(tmp_path / "nhwc", "train.channels_last=true")
    convs = [m for m in trainer.method.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    batch = trainer.to_device(next(trainer.streams()[0]))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["mask"].dim() == 3  # masks keep their layout
    assert losses == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_compiled_student_gives_the_same_losses(tmp_path: Path) -> None:
    _, reference = first_steps(tmp_path / "eager")
    trainer, losses = first_steps(tmp_path / "compiled", "train.compile=true")
    assert trainer.method._student_forward[0] is not trainer.method.student  # forward goes through the compiled module
    assert losses == pytest.approx(reference, rel=1e-4)


def test_amp_dtype_is_checked_and_chosen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.amp_dtype.*float8.*bfloat16"):
        tiny_config(tmp_path, "train.amp_dtype=float8")
    cfg = tiny_config(tmp_path, "method.name=source_only", "train.amp_dtype=float16")
    trainer = Trainer(cfg)
    assert trainer.evaluator.amp_dtype == torch.float16
    assert not trainer.evaluator.use_amp and not trainer.scaler.is_enabled()  # on a CPU autocast stays off


def test_one_teacher_pass_over_target_and_source_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LPCGMA runs its teacher once over target + source (the Gaussian memory's source features):
    the losses and the remembered features equal those of two separate teacher passes."""
    from lpcgma.methods.lpcgma import LPCGMA
    from lpcgma.methods.self_training import SelfTraining

    calls: list[int] = []
    fused, fused_losses = first_steps(tmp_path / "fused", steps=3)
    src, tgt = fused.streams()
    batches = fused.to_device(next(src)), fused.to_device(next(tgt))
    assert "source_embed" in fused.method.teacher_forward(*batches)  # the one-pass path is the one taken

    def separate(self: LPCGMA, source: dict, target: dict) -> dict:  # the code before: target only here
        calls.append(1)
        return SelfTraining.teacher_forward(self, source, target)

    monkeypatch.setattr(LPCGMA, "teacher_forward", separate)
    two_pass, two_pass_losses = first_steps(tmp_path / "separate", steps=3)
    assert calls == [1, 1, 1]  # the separate path ran (the memory then takes its own source pass)
    assert fused_losses == pytest.approx(two_pass_losses, rel=1e-5, abs=1e-6)
    memory, reference = fused.method.prototypes.state_dict(), two_pass.method.prototypes.state_dict()
    assert memory.keys() == reference.keys() and memory
    for key, value in memory.items():
        assert torch.allclose(value.float(), reference[key].float(), rtol=1e-4, atol=1e-5), key


def test_the_fused_optimiser_of_a_gpu_run_trains_like_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the trainer builds the fused AdamW/SGD kernels; run here on the CPU (where fused
    kernels exist too), they give the default implementation's losses up to rounding."""
    _, reference = first_steps(tmp_path / "default", steps=3)
    build = Trainer._build_optimizer

    def fused_build(self: Trainer) -> torch.optim.Optimizer:
        optimizer = build(self)
        assert optimizer.defaults["fused"] is False  # the CPU keeps the default implementation
        for group in optimizer.param_groups:
            group["fused"] = True
        return optimizer

    monkeypatch.setattr(Trainer, "_build_optimizer", fused_build)
    trainer, losses = first_steps(tmp_path / "fused", steps=3)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    assert losses == pytest.approx(reference, rel=1e-4)


def test_static_anchor_slots_train_with_every_term(tmp_path: Path) -> None:
    """`method.static_anchors=true` (fixed anchor slots, no host sync) trains with finite losses and
    logs how many slots held an anchor."""
    trainer, losses = first_steps(tmp_path, "method.static_anchors=true", steps=2)
    assert all(math.isfinite(x) for x in losses)
    src, tgt = trainer.streams()
    logs = trainer.run_step(next(src), next(tgt))
    assert 0 < float(logs["pmc/anchors"]) <= trainer.method.options.max_anchors
