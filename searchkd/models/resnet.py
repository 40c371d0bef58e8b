"""The CIFAR ResNets of the KD zoo (resnet8…110, resnet8x4, resnet32x4), RepDistiller-compatible.

resnetN has N = 6n+2 layers: a 3×3 stem, three stages of n basic blocks (strides 1, 2, 2),
global average pool, linear head. The "x4" variants use a 32-channel stem and 64/128/256
stages. Parameter names follow the public checkpoints (conv1, bn1, layer1…, fc) so the
published teachers load unchanged. `width` scales every channel count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, run_stages, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(TappedModel):
    def __init__(
        self,
        depth: int,
        stem: int,
        stages: tuple[int, int, int],
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"resnet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stem_c = scaled(stem, width)
        chans = [scaled(c, width) for c in stages]
        self.conv1 = nn.Conv2d(in_channels, stem_c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_c)
        layers = []
        inplanes = stem_c
        for i, (c, stride) in enumerate(zip(chans, (1, 2, 2), strict=True)):
            blocks = [
                BasicBlock(inplanes if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            inplanes = c
            setattr(self, f"layer{i + 1}", layers[-1])
        self.stages = layers
        self.fc = nn.Linear(inplanes, num_classes)
        self.stage_channels = chans
        self.feature_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Features:
        stem = F.relu(self.bn1(self.conv1(x)))
        h, maps = run_stages(self.stages, stem)
        pool = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.fc(pool))


def _resnet(default_depth: int, stem: int, stages: tuple[int, int, int]):
    def build(
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int | None = None,
    ) -> CifarResNet:
        return CifarResNet(depth or default_depth, stem, stages, num_classes, width, in_channels)

    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_resnet(_depth, 16, (16, 32, 64)))
register_model("resnet8x4")(_resnet(8, 32, (64, 128, 256)))
register_model("resnet32x4")(_resnet(32, 32, (64, 128, 256)))
