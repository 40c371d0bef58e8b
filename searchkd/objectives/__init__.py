"""Distillation objectives: one file each, registered by decorator on import."""

from . import ce, cktf, crd, kd, lfcc, msd, stkd  # noqa: F401  (register)
from .base import (
    Objective,
    ObjectiveContext,
    Tunable,
    common_tunables,
    get_objective,
    kd_loss,
    objective_names,
    register_objective,
)

__all__ = [
    "Objective",
    "ObjectiveContext",
    "Tunable",
    "common_tunables",
    "get_objective",
    "kd_loss",
    "objective_names",
    "register_objective",
]
