"""DeepLabv2: output stride 8, output keys and shapes, L2-normalised embeddings, EMA teacher."""

from __future__ import annotations

import pytest
import torch

from lpcgma.models import DeepLabV2, EMATeacher, PretrainedWeightsError, upsample_logits


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_forward_shapes_output_stride_8(backbone: str) -> None:
    torch.manual_seed(0)
    model = DeepLabV2(7, backbone, pretrained=False, proj_dim=16).eval()
    out = model(torch.randn(2, 3, 64, 80))
    assert out["logits"].shape == (2, 7, 8, 10)
    assert out["embed"].shape == (2, 16, 8, 10)
    assert out["aspp"].shape == (2, 28, 8, 10)
    torch.testing.assert_close(out["embed"].norm(dim=1), torch.ones(2, 8, 10))
    # the summed ASPP branches are the logits
    torch.testing.assert_close(out["aspp"].reshape(2, 4, 7, 8, 10).sum(1), out["logits"])
    assert upsample_logits(out["logits"], (64, 80)).shape == (2, 7, 64, 80)


def test_param_groups_cover_all_parameters_once() -> None:
    model = DeepLabV2(7, "resnet18", pretrained=False, proj_dim=16)
    ids = [id(p) for p in model.encoder_parameters()] + [id(p) for p in model.head_parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_pretrained_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; no network here
    monkeypatch.setattr(
        "torch.hub.load_state_dict_from_url",
        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")),
    )
    with pytest.raises(PretrainedWeightsError, match=r"resnet18.*checkpoints.*pretrained=false"):
        DeepLabV2(7, "resnet18", pretrained=True)


def test_ema_teacher_tracks_student() -> None:
    torch.manual_seed(0)
    student = DeepLabV2(3, "resnet18", pretrained=False, proj_dim=8)
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.net.parameters()]
    teacher.update(student, step=1000)  # momentum 0.9 after the ramp
    for b, t, s in zip(before, teacher.net.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.net.training


@pytest.mark.parametrize("momentum", [0.1, 0.01])
def test_bn_momentum_sets_how_far_one_batch_moves_the_running_statistics(momentum: float) -> None:
    from lpcgma.config import ModelConfig
    from lpcgma.models import build_model

    model = build_model(ModelConfig(backbone="resnet18", pretrained=False, proj_dim=8, bn_momentum=momentum), 3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and {m.momentum for m in bns} == {momentum}
    stem_bn = model.stem[1]
    before = stem_bn.running_mean.clone()
    model.train()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32) + 3.0
        batch_mean = model.stem[0](x).mean(dim=(0, 2, 3))
        model(x)
    torch.testing.assert_close(stem_bn.running_mean, (1 - momentum) * before + momentum * batch_mean)
