"""Model zoo: every family registers itself on import and honours the `Features` contract."""

from . import (
    imagenet,  # noqa: F401  (registers torchvision's ImageNet ResNets and MobileNetV3s)
    mixer,  # noqa: F401  (registers mixer_tiny)
    mobilenetv2,  # noqa: F401  (registers MobileNetV2 / mobile_half)
    resnet,  # noqa: F401  (registers the CIFAR ResNets)
    shufflenet,  # noqa: F401  (registers ShuffleV1, ShuffleV2)
    vgg,  # noqa: F401  (registers the CIFAR VGGs)
    vit,  # noqa: F401  (registers vit_tiny)
    wrn,  # noqa: F401  (registers the wide ResNets)
)
from .base import (
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

__all__ = [
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
