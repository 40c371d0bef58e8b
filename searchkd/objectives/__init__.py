"""Distillation objectives: one file each, registered by decorator on import."""

from . import ce, cktf, crd, kd, lfcc, msd, stkd  # noqa: F401  (register)
from .base import (
    LABEL_TERMS,
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

__all__ = [
    "LABEL_TERMS",
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
