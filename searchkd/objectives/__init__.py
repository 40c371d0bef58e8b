"""Distillation objectives: one file each, registered by decorator when the package loads
every module in it (a new objective is a new file here and nothing else)."""

from ..registry import load_package
from .base import (
    LABEL_TERMS,
    OBJECTIVES,
    Objective,
    ObjectiveContext,
    Tunable,
    common_tunables,
    get_objective,
    kd_loss,
    label_tunables,
    objective_names,
    register_objective,
    with_own_terms,
)

load_package(__name__, __path__)

__all__ = [
    "LABEL_TERMS",
    "OBJECTIVES",
    "Objective",
    "ObjectiveContext",
    "Tunable",
    "common_tunables",
    "get_objective",
    "kd_loss",
    "label_tunables",
    "objective_names",
    "register_objective",
    "with_own_terms",
]
