"""Model zoo: every family registers itself on import and honours the `Features` contract."""

from . import resnet  # noqa: F401  (registers the CIFAR ResNets)
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
