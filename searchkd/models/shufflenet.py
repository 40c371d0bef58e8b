"""ShuffleNet V1 and V2 for 32×32 inputs ("ShuffleV1", "ShuffleV2"), RepDistiller-compatible.

The CIFAR variants use a 1×1, 24-channel, stride-1 stem and no max-pool, so 32×32 inputs keep
resolution until the three down-sampling stages (16, 8, 4). ShuffleV1 is g=3 with 240/480/960
channels; ShuffleV2 is the 1× model (116/232/464, 1024-channel head). Taps: stem, then each
stage's output. Parameter names (conv1, bn1, layer1…3, linear, conv2, bn2) follow the public
checkpoints. `width` scales every channel count; counts are rounded to what the grouped
convolutions and the channel split need, so any width builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, run_stages

_STEM = 24  # stem channels of both CIFAR ShuffleNets


def _round_to(channels: float, multiple: int) -> int:
    """Nearest multiple of `multiple`, at least one multiple."""
    return max(multiple, int(round(channels / multiple)) * multiple)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the groups so the next grouped conv mixes information across them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# --------------------------------------------------------------------------- ShuffleNet V1

_V1_GROUPS = 3  # the g=3 model is the one the KD tables use
_V1_STAGES = (240, 480, 960)  # out channels per stage for g=3 (Zhang et al. 2018, table 1)
_V1_BLOCKS = (4, 8, 4)


class V1Bottleneck(nn.Module):
    """Grouped 1×1, shuffle, depthwise 3×3, grouped 1×1. Down-sampling units concatenate an
    average-pooled shortcut instead of adding it, which is why they output in + out channels."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, first: bool
    ) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4  # bottleneck ratio 1/4 from the paper
        # The very first unit sees the 24-channel stem, too few channels to group.
        g = 1 if first else groups
        self.g1 = g
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(TappedModel):
    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        g = _V1_GROUPS
        # Multiples of 4g keep both the bottleneck (out/4) and the grouped convs divisible by g.
        unit = 4 * g
        stem = _round_to(_STEM * width, unit)
        chans: list[int] = []
        prev = stem
        for c in _V1_STAGES:
            # A down-sampling unit outputs c - prev new channels, so each stage must grow.
            prev = max(_round_to(c * width, unit), prev + unit)
            chans.append(prev)
        self.conv1 = nn.Conv2d(in_channels, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_planes = stem
        layers = []
        for i, (c, n) in enumerate(zip(chans, _V1_BLOCKS, strict=True)):
            units = []
            for j in range(n):
                down = j == 0
                units.append(
                    V1Bottleneck(
                        in_planes,
                        c - in_planes if down else c,
                        2 if down else 1,
                        g,
                        first=(i == 0 and down),
                    )
                )
                in_planes = c
            layers.append(nn.Sequential(*units))
            setattr(self, f"layer{i + 1}", layers[-1])
        self.stages = layers
        self.linear = nn.Linear(in_planes, num_classes)
        self.stage_channels = chans
        self.feature_dim = in_planes

    def forward_features(self, x: Tensor) -> Features:
        stem = F.relu(self.bn1(self.conv1(x)))
        h, maps = run_stages(self.stages, stem)
        pool = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.linear(pool))


# --------------------------------------------------------------------------- ShuffleNet V2

_V2_STAGES = (116, 232, 464)  # the 1× model (Ma et al. 2018, table 5)
_V2_BLOCKS = (3, 7, 3)  # basic units per stage after the down-sampling unit, as RepDistiller
_V2_HEAD = 1024  # final 1×1 conv of the 1× model


class V2BasicBlock(nn.Module):
    """Split channels in half; transform one half (1×1, depthwise 3×3, 1×1); concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        c = channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class V2DownBlock(nn.Module):
    """Both branches stride 2 and each produces half the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(TappedModel):
    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        # Even counts: the down-sampling unit's two branches and the shuffle split them in half.
        stem = _round_to(_STEM * width, 2)
        chans = [_round_to(c * width, 2) for c in _V2_STAGES]
        head = _round_to(_V2_HEAD * width, 2)
        self.conv1 = nn.Conv2d(in_channels, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_c = stem
        layers = []
        for i, (c, n) in enumerate(zip(chans, _V2_BLOCKS, strict=True)):
            layers.append(nn.Sequential(V2DownBlock(in_c, c), *[V2BasicBlock(c) for _ in range(n)]))
            setattr(self, f"layer{i + 1}", layers[-1])
            in_c = c
        self.stages = layers
        self.conv2 = nn.Conv2d(in_c, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.linear = nn.Linear(head, num_classes)
        self.stage_channels = chans
        self.feature_dim = head

    def forward_features(self, x: Tensor) -> Features:
        stem = F.relu(self.bn1(self.conv1(x)))
        h, maps = run_stages(self.stages, stem)
        pool = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(h))), 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.linear(pool))


@register_model("ShuffleV1")
def shufflev1(
    num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 32
) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, width, in_channels)


@register_model("ShuffleV2")
def shufflev2(
    num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 32
) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, width, in_channels)
