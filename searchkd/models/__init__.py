"""Model zoo: every family registers itself when the package loads its modules, and honours
the `Features` contract (the CIFAR ResNets, WRNs, VGGs, MobileNetV2, ShuffleNets, vit_tiny,
mixer_tiny, and torchvision's ImageNet ResNets and MobileNetV3s)."""

from ..registry import load_package
from .base import (
    MODELS,
    Features,
    TappedModel,
    build_model,
    count_macs,
    count_params,
    model_names,
    register_model,
    scaled,
    tokens_to_map,
)

load_package(__name__, __path__)

__all__ = [
    "MODELS",
    "Features",
    "TappedModel",
    "build_model",
    "count_macs",
    "count_params",
    "model_names",
    "register_model",
    "scaled",
    "tokens_to_map",
]
