"""DeepLabv2: a dilated ResNet (output stride 8) + ASPP classifier + a projection head.

The standard network of the UDA segmentation literature (AdaptSegNet, DACS, SDCA, BiDA): ResNet-101
with dilation in layer3/layer4, and DeepLabv2's ASPP whose four dilated 3×3 branches each predict
class logits and are summed. ResNet-50/18 variants serve small machines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import (
    ResNet,
    ResNet18_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    resnet18,
    resnet50,
    resnet101,
)

from lpcgma.config import ModelConfig
from lpcgma.models.batchnorm import set_bn_momentum

_BACKBONES = {
    "resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (resnet101, ResNet101_Weights.IMAGENET1K_V1, 2048),
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be loaded (offline, no cached file)."""


class ASPPClassifier(nn.Module):
    """DeepLabv2 ASPP: parallel dilated 3×3 convs to class logits, summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outs = [b(x) for b in self.branches]
        return torch.stack(outs).sum(0), torch.cat(outs, dim=1)


class ProjectionHead(nn.Module):
    """Two-layer 1×1 conv head to L2-normalised embeddings (the contrastive/prototype space)."""

    def __init__(self, in_channels: int, proj_dim: int, hidden: int = 512) -> None:
        super().__init__()
        hidden = min(hidden, in_channels)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, proj_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


def _make_backbone(name: str, pretrained: bool) -> tuple[ResNet, int]:
    if name not in _BACKBONES:
        raise ValueError(f"model.backbone = {name!r} is invalid: expected one of {sorted(_BACKBONES)}")
    ctor, weights, channels = _BACKBONES[name]
    # BasicBlock (resnet18) does not support dilation in torchvision: dilate its convs by hand below.
    dilate = [False, True, True] if name != "resnet18" else None
    if pretrained:
        try:
            net = ctor(weights=weights, replace_stride_with_dilation=dilate) if dilate else ctor(weights=weights)
        except Exception as e:  # offline: urllib errors, missing cache
            raise PretrainedWeightsError(
                f"model.pretrained=true but the ImageNet weights for {name} could not be loaded ({e}). "
                f"Put the file {weights.url.rsplit('/', 1)[-1]} into "
                f"{torch.hub.get_dir()}/checkpoints/ (from {weights.url}), or set model.pretrained=false."
            ) from e
    else:
        net = ctor(weights=None, replace_stride_with_dilation=dilate) if dilate else ctor(weights=None)
    if name == "resnet18":
        _dilate_basic_layers(net)
    return net, channels


def _dilate_basic_layers(net: ResNet) -> None:
    """Output stride 8 for BasicBlock ResNets: stride 1 + dilation 2/4 in layer3/layer4."""
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for i, block in enumerate(layer):
            for conv in (block.conv1, block.conv2):
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                if i > 0 or conv is block.conv2:
                    conv.dilation = (dilation, dilation)
                    conv.padding = (dilation, dilation)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


class DeepLabV2(nn.Module):
    """DeepLabv2 with a projection head; forward returns logits, embeddings and ASPP branches."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool = False,
        proj_dim: int = 64,
        aspp_dilations: Sequence[int] = (6, 12, 18, 24),
    ) -> None:
        super().__init__()
        net, channels = _make_backbone(backbone, pretrained)
        self.num_classes = num_classes
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.classifier = ASPPClassifier(channels, num_classes, aspp_dilations)
        self.projector = ProjectionHead(channels, proj_dim)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters (base learning rate)."""
        return [p for m in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4) for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Decoder and projection-head parameters (×head_lr_mult learning rate)."""
        return [*self.classifier.parameters(), *self.projector.parameters()]

    def forward(self, x: Tensor, detach_embed: bool = False) -> dict[str, Tensor]:
        """Logits, embeddings and ASPP branches; `detach_embed`: the projection head sees the backbone
        features detached (a loss on the embeddings then trains the head only)."""
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        logits, aspp = self.classifier(f)
        return {"logits": logits, "embed": self.projector(f.detach() if detach_embed else f), "aspp": aspp}


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling of feature-resolution logits to the input size."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationPredictor(nn.Module):
    """Inference wrapper: image [B,3,H,W] (normalised) → class logits [B,C,H,W] at input size."""

    def __init__(self, model: DeepLabV2) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return upsample_logits(self.model(x)["logits"], (x.shape[-2], x.shape[-1]))


def build_model(cfg: ModelConfig, num_classes: int) -> DeepLabV2:
    """The student network described by `cfg`."""
    model = DeepLabV2(num_classes, cfg.backbone, cfg.pretrained, cfg.proj_dim, cfg.aspp_dilations)
    set_bn_momentum(model, cfg.bn_momentum)
    return model
