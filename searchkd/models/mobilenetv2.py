"""MobileNetV2 as the KD zoo uses it: RepDistiller's "mobile_half" for 32×32 inputs.

RepDistiller's CIFAR variant (from Route Constrained Optimization) differs from the ImageNet
network: expansion 6, the 24-channel group keeps stride 1, and it runs at width 0.5 with the
1280-channel head left unscaled. Here `width` multiplies on top of that 0.5, so width=1.0 is
exactly mobile_half (the student of the CRD tables). Taps follow RepDistiller's feature list:
stem, then the outputs of inverted-residual groups 2, 3, 5 and 7 (strides 2, 4, 8, 16 at the
stem's /2 resolution). Parameter names (conv1, blocks, conv2, classifier) follow the
public checkpoints.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, scaled

_BASE_WIDTH = 0.5  # mobile_half: the width RepDistiller trained the CIFAR student at
_EXPANSION = 6  # inverted-residual expansion ratio T of mobile_half
# (expansion, channels, blocks, first stride) per group; expansion None means _EXPANSION.
# Group 2 keeps stride 1 (unlike ImageNet MobileNetV2) so 32×32 inputs end at 2×2, not 1×1.
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
_STEM = 32  # stem channels before the width multiplier
_HEAD = 1280  # last 1×1 conv; scaled only when the effective width exceeds 1, as in MobileNetV2
_TAP_GROUPS = (1, 2, 4, 6)  # groups whose outputs are the stage taps (RepDistiller's f1-f4)


def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3×3, linear pointwise project; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(TappedModel):
    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        mult = _BASE_WIDTH * width
        c_in = scaled(_STEM, mult)
        self.conv1 = _conv_bn(in_channels, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        group_out = []
        for expand, c, n, s in _SETTING:
            c_out = scaled(c, mult)
            layers = []
            for i in range(n):
                layers.append(
                    InvertedResidual(c_in, c_out, s if i == 0 else 1, expand or _EXPANSION)
                )
                c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
            group_out.append(c_out)
        self.last_channel = scaled(_HEAD, mult) if mult > 1.0 else _HEAD
        self.conv2 = _conv_bn(c_in, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.stage_channels = [group_out[i] for i in _TAP_GROUPS]
        self.feature_dim = self.last_channel
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)  # small head init, as RepDistiller
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Features:
        stem = self.conv1(x)
        h = stem
        maps = []
        for i, group in enumerate(self.blocks):
            h = group(h)
            if i in _TAP_GROUPS:
                maps.append(h)
        pool = F.adaptive_avg_pool2d(self.conv2(h), 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.classifier(pool))


@register_model("MobileNetV2", "mobilenetv2")
def mobilenetv2(
    num_classes: int, width: float = 1.0, in_channels: int = 3, image_size: int = 32
) -> MobileNetV2:
    return MobileNetV2(num_classes, width, in_channels)
