"""torchvision's ImageNet networks (resnet18/34/50, mobilenet_v3_small/large) with taps and a width.

These are the ImageNet-layout teachers and students (7×7 stride-2 stem and max-pool for the
ResNets, /32 overall). Weights are never downloaded: a search trains or loads its own
checkpoints. The ResNets are rebuilt from torchvision's own blocks because torchvision fixes
the stage widths at 64…512; the MobileNets use torchvision's `width_mult`. Module names match
torchvision's (conv1, layer1…, fc; features, avgpool, classifier), so at width 1 with 3 input
channels torchvision state dicts load unchanged. Adaptive pooling everywhere, so any input of
at least 1×1 after the stem runs, 8×8 digits included.
The stem tap is the input of the first stage (after the ResNets' max-pool).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.resnet import BasicBlock, Bottleneck

from .base import Features, TappedModel, register_model, run_stages, scaled

# ---------------------------------------------------------------------------- ResNets

_RESNET_STEM = 64  # stem channels of every torchvision ResNet
_RESNET_PLANES = (64, 128, 256, 512)  # per-stage planes (Bottleneck outputs 4× these)
_RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ImageNetResNet(TappedModel):
    def __init__(
        self, depth: int, num_classes: int, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth not in _RESNET_LAYOUTS:
            raise ValueError(f"resnet depth must be one of {sorted(_RESNET_LAYOUTS)}, got {depth}")
        block, counts = _RESNET_LAYOUTS[depth]
        stem = scaled(_RESNET_STEM, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = stem
        stages = []
        chans = []
        for i, (planes, n) in enumerate(zip(_RESNET_PLANES, counts, strict=True)):
            planes = scaled(planes, width)
            stride = 1 if i == 0 else 2
            out = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )
            blocks = [block(inplanes, planes, stride, downsample)]
            blocks += [block(out, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            setattr(self, f"layer{i + 1}", stages[-1])
            chans.append(out)
            inplanes = out
        self.stages = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.stage_channels = chans
        self.feature_dim = inplanes
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Features:
        stem = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        h, maps = run_stages(self.stages, stem)
        pool = self.avgpool(h).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.fc(pool))


def _resnet(default_depth: int):
    def build(
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 224,
        depth: int | None = None,
    ) -> ImageNetResNet:
        return ImageNetResNet(depth or default_depth, num_classes, width, in_channels)

    return build


for _depth in (18, 34, 50):
    register_model(f"resnet{_depth}")(_resnet(_depth))

# ---------------------------------------------------------------------------- MobileNetV3


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.stride[0] > 1 for m in module.modules())


class ImageNetMobileNetV3(TappedModel):
    """Stages start at each stride-2 block (the resolutions /4, /8, /16, /32); blocks before the
    first of them belong to the stem and the final 1×1 conv to the last stage, so both sizes
    have four stages like the ResNets. The penultimate vector is the classifier's hidden layer
    (input of the last Linear), the same position `pool` has in every other model."""

    def __init__(
        self, large: bool, num_classes: int, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        factory = mobilenet_v3_large if large else mobilenet_v3_small
        net = factory(weights=None, num_classes=num_classes, width_mult=width)
        first = net.features[0][0]
        if in_channels != first.in_channels:
            conv = nn.Conv2d(
                in_channels,
                first.out_channels,
                first.kernel_size,
                first.stride,
                first.padding,
                bias=False,
            )
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # torchvision's init
            net.features[0][0] = conv
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = net.classifier
        # Split features into [stem | stage 1 | … ]: a new segment starts at each down-sampling
        # block after the stem's own stride-2 conv.
        bounds = [0] + [i for i in range(1, len(self.features)) if _downsamples(self.features[i])]
        bounds.append(len(self.features))
        self.segments = list(zip(bounds[:-1], bounds[1:], strict=True))
        self.stage_channels = [
            _out_channels(self.features[end - 1]) for _, end in self.segments[1:]
        ]
        self.feature_dim = self.classifier[0].out_features

    def forward_features(self, x: Tensor) -> Features:
        outputs = []
        h = x
        for start, end in self.segments:
            for i in range(start, end):
                h = self.features[i](h)
            outputs.append(h)
        # classifier = Linear, Hardswish, Dropout, Linear
        pool = self.classifier[1](self.classifier[0](self.avgpool(h).flatten(1)))
        logits = self.classifier[3](self.classifier[2](pool))
        return Features(stem=outputs[0], stages=outputs[1:], pool=pool, logits=logits)


def _out_channels(module: nn.Module) -> int:
    """Channels a feature block emits: those of its last conv."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


@register_model("mobilenet_v3_small")
def mobilenet_v3_small_tapped(
    num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 224
) -> ImageNetMobileNetV3:
    return ImageNetMobileNetV3(False, num_classes, width, in_channels)


@register_model("mobilenet_v3_large")
def mobilenet_v3_large_tapped(
    num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 224
) -> ImageNetMobileNetV3:
    return ImageNetMobileNetV3(True, num_classes, width, in_channels)
