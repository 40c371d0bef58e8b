"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19), RepDistiller-compatible.

Five conv blocks (3×3 conv-BN-ReLU), max-pooling between the first four, global average pool
and a single Linear(512, classes): RepDistiller dropped VGG's fully connected stack for CIFAR,
which is why vgg13 is 9.5M parameters and not 130M. The stem tap is block0's output and the
stage taps are blocks 1-4 (post-ReLU), the maps RepDistiller's feature objectives used.
Parameter names (block0…block4 as Sequentials, classifier) follow the public checkpoints.
`width` scales every channel count.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, scaled

# Channels of each conv in each of the five blocks (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
_CFGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
# Inputs at least this large get the fourth max-pool too (RepDistiller pools there only for
# 64×64 inputs), so the last maps stay a few cells wide instead of growing with the input.
_EXTRA_POOL_SIZE = 64


def _block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU per entry, without the last ReLU: forward applies it so the tap stays
    explicit."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [
            nn.Conv2d(in_channels, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        ]
        in_channels = c
    return nn.Sequential(*layers[:-1])


class CifarVGG(TappedModel):
    def __init__(
        self, cfg: list[list[int]], num_classes: int, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        chans = [[scaled(c, width) for c in block] for block in cfg]
        blocks = []
        prev = in_channels
        for i, block in enumerate(chans):
            blocks.append(_block(block, prev))
            setattr(self, f"block{i}", blocks[-1])
            prev = block[-1]
        self.blocks = blocks
        # ceil_mode keeps odd or 1×1 maps (tiny inputs such as 8×8 digits) from pooling to zero;
        # on the even CIFAR sizes it is identical to floor mode.
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.classifier = nn.Linear(prev, num_classes)
        self.stage_channels = [block[-1] for block in chans[1:]]
        self.feature_dim = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # RepDistiller's small head init (std 0.01) keeps the initial logits near zero.
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Features:
        extra_pool = x.shape[-2] >= _EXTRA_POOL_SIZE
        stem = F.relu(self.blocks[0](x))
        h = stem
        maps = []
        for i, block in enumerate(self.blocks[1:], start=1):
            if i < 4 or extra_pool:
                h = self.pool(h)
            h = F.relu(block(h))
            maps.append(h)
        pool = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.classifier(pool))


def _vgg(default_depth: int):
    def build(
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int | None = None,
    ) -> CifarVGG:
        depth = depth or default_depth
        if depth not in _CFGS:
            raise ValueError(f"vgg depth must be one of {sorted(_CFGS)}, got {depth}")
        return CifarVGG(_CFGS[depth], num_classes, width, in_channels)

    return build


for _depth in _CFGS:
    register_model(f"vgg{_depth}")(_vgg(_depth))
