"""The model contract every objective relies on: logits plus named feature taps.

Objectives never reach into a model's layers. They ask for `forward_features(x)` and get a
`Features` record with the stem output, each stage's output (always B×C×H×W: ViT and Mixer
token maps are reshaped to maps by the model), the penultimate vector and the logits. That
one contract is what lets every objective work with every teacher/student pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import Registry


@dataclass
class Features:
    stem: Tensor
    stages: list[Tensor]
    pool: Tensor
    logits: Tensor


class TappedModel(nn.Module):
    """Base class: subclasses implement `forward_features`; `forward` returns logits.

    Every model of the zoo also declares the shapes objectives build their heads from:
    `stage_channels` (the channels of each tapped stage, in `Features.stages` order) and
    `feature_dim` (the width of the pooled feature `Features.pool`).
    """

    stage_channels: list[int]
    feature_dim: int

    def forward_features(self, x: Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).logits


def run_stages(stages: list[nn.Module] | nn.ModuleList, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run `x` through the stages in order: (last output, every stage's output as a tap)."""
    maps = []
    for stage in stages:
        x = stage(x)
        maps.append(x)
    return x, maps


def tokens_to_map(tokens: Tensor) -> Tensor:
    """B×N×C tokens (no class token) → B×C×√N×√N: ViT and MLP taps read as maps, so objectives
    written for CNN feature maps work on them unchanged."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot reshape {n} tokens to a square map")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """Channels under a width multiplier, rounded to the nearest integer, never below `minimum`."""
    return max(minimum, int(round(channels * width)))


ModelBuilder = Callable[..., TappedModel]
MODELS: Registry[ModelBuilder] = Registry("arch")
# A builder `(num_classes, width, in_channels, image_size, **kw) -> TappedModel`, under its names.
register_model = MODELS.register
model_names = MODELS.names


def build_model(
    arch: str,
    num_classes: int,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs: object,
) -> TappedModel:
    builder = MODELS.get(arch)
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return builder(
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        image_size=image_size,
        **kwargs,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass of one sample, from torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example[:1])
    model.train(was_training)
    return counter.get_total_flops() // 2
