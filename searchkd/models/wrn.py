"""Wide ResNets of the KD zoo (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2), RepDistiller-compatible.

wrn_D_W has D = 6n+4 layers: a 16-channel 3×3 stem, three stages of n pre-activation basic
blocks with 16W/32W/64W channels (strides 1, 2, 2), a final BN-ReLU, global average pool and a
linear head. Pre-activation means a block's output is the raw residual sum, so the stage taps
are un-normalised, exactly the maps RepDistiller's feature objectives saw. Parameter names
(conv1, block1.layer.0.bn1, …, convShortcut, bn1, fc) follow the public checkpoints so the
published teachers load unchanged. `width` scales every channel count, stem included.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, run_stages, scaled

_STEM = 16  # stem channels of every WRN, independent of the widen factor (Zagoruyko & Komodakis)
_BASE = (16, 32, 64)  # per-stage channels before the widen factor
_STRIDES = (1, 2, 2)  # 32×32 → 32, 16, 8: the CIFAR stage resolutions


class PreActBlock(nn.Module):
    """BN-ReLU-conv ×2; the 1×1 shortcut sees the normalised input, as in the original WRN."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage; the extra `layer` level only mirrors the checkpoint parameter names."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(TappedModel):
    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wrn depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        stem_c = scaled(_STEM, width)
        chans = [scaled(c * widen, width) for c in _BASE]
        self.conv1 = nn.Conv2d(in_channels, stem_c, 3, 1, 1, bias=False)
        blocks = []
        inplanes = stem_c
        for i, (c, stride) in enumerate(zip(chans, _STRIDES, strict=True)):
            blocks.append(NetworkBlock(n, inplanes, c, stride))
            setattr(self, f"block{i + 1}", blocks[-1])
            inplanes = c
        self.stages = blocks
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)
        self.stage_channels = chans
        self.feature_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init with fan_out, as the WRN reference code does.
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Features:
        stem = self.conv1(x)
        h, maps = run_stages(self.stages, stem)
        pool = F.adaptive_avg_pool2d(F.relu(self.bn1(h)), 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.fc(pool))


def _wrn(default_depth: int, widen: int):
    def build(
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int | None = None,
    ) -> WideResNet:
        return WideResNet(depth or default_depth, widen, num_classes, width, in_channels)

    return build


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}")(_wrn(_depth, _widen))
