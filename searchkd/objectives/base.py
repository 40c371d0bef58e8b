"""The objective contract and its registry.

An objective is an `nn.Module` (its heads and memory banks are its parameters and buffers,
so they travel in the trial checkpoint) that, given student and teacher, returns the student
logits and a dict of named, already-weighted loss terms whose sum is the training loss:

    L = ce_weight·CE(z_s, y) + kd_weight·KD(z_s, z_t; kd_temperature) + weight·L_obj

Each objective declares its tunables (`Tunable`) beside its math; the spec layer validates a
space's `loss.*` keys against them and the search layer turns them into Optuna parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import Features, TappedModel
from ..registry import Registry


@dataclass(frozen=True)
class Tunable:
    """One hyperparameter of an objective: its type, default, valid values and search range.

    kind: "float" | "int" | "str" | "ints" (a list of positive ints, e.g. scales).
    search: the range a search would use, in space-file syntax ({"float": [lo, hi], "log": true},
    {"int": [lo, hi]} or {"choice": [...]}).
    """

    kind: str
    default: Any
    help: str
    search: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def check(self, key: str, value: Any) -> Any:
        """Return `value` coerced to this tunable's type, or raise ValueError saying why."""
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, got {value!r}")
            value = float(value)
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        elif self.kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")
        elif self.kind == "ints":
            if (
                not isinstance(value, list | tuple)
                or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            ):
                raise ValueError(
                    f"{key} must be a non-empty list of positive integers, got {value!r}"
                )
            value = [int(v) for v in value]
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{key} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{key} must be >= {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{key} must be <= {self.high}, got {value!r}")
        return value


# The keys of the label terms (CE on the labels, Hinton's KD on the teacher's logits). No
# objective's own term may use one: it would silently replace that term (registration and
# every forward pass check it).
LABEL_TERMS = ("ce", "kd")


def label_tunables(
    ce_weight: float = 1.0, kd_weight: float = 0.0, kd_temperature: float = 4.0
) -> dict[str, Tunable]:
    """The weights of the label terms, shared by every objective with its own defaults."""
    return {
        "ce_weight": Tunable(
            "float",
            ce_weight,
            "weight of cross-entropy on the labels",
            {"float": [0.0, 2.0]},
            low=0.0,
        ),
        "kd_weight": Tunable(
            "float", kd_weight, "weight of Hinton's KD term", {"float": [0.0, 2.0]}, low=0.0
        ),
        "kd_temperature": Tunable(
            "float",
            kd_temperature,
            "softmax temperature of the KD term",
            {"float": [1.0, 8.0]},
            low=1e-3,
        ),
    }


def common_tunables(
    ce_weight: float = 1.0, kd_weight: float = 0.0, kd_temperature: float = 4.0, weight: float = 1.0
) -> dict[str, Tunable]:
    """The label weights plus `weight`, the weight of the objective's own term L_obj: for
    objectives that have one (kd and ce have none, so they declare no `weight`)."""
    return {
        **label_tunables(ce_weight, kd_weight, kd_temperature),
        "weight": Tunable(
            "float",
            weight,
            "weight of the objective's own term L_obj",
            {"float": [0.1, 10.0], "log": True},
            low=0.0,
        ),
    }


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know about the data beyond feature shapes.

    `train_labels`: the label of every training sample, in sample-index order, when the
    dataset knows them before training (every built-in one does), so an objective that draws
    negatives from other classes does so from its first batch on.
    """

    num_classes: int
    num_train: int
    train_labels: Tensor | None = None


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's KD: KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T², averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class Objective(nn.Module):
    """Base objective: CE + KD + weight · `distill(...)`.

    Subclasses set `name` and `tunables`, build their heads in `__init__` from example
    feature shapes, and implement `distill`. An objective with several weighted terms of its
    own overrides `own_terms` and `own_term_weights`; one that changes the inputs (mixup) or
    the label term overrides `forward`.
    """

    name: ClassVar[str]
    tunables: ClassVar[dict[str, Tunable]]
    needs_teacher: ClassVar[bool] = True

    def __init__(
        self,
        hp: Mapping[str, Any],
        teacher_features: Features,
        student_features: Features,
        ctx: ObjectiveContext,
    ) -> None:
        super().__init__()
        self.hp = dict(self.resolve(hp))
        self.ctx = ctx

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `overrides`, each checked; unknown keys name the valid ones."""
        unknown = sorted(set(overrides) - set(cls.tunables))
        if unknown:
            raise KeyError(
                f"unknown loss key {unknown[0]!r} for objective {cls.name!r}; "
                f"valid: {', '.join(sorted(cls.tunables))}"
            )
        out = {k: t.default for k, t in cls.tunables.items()}
        for k, v in overrides.items():
            out[k] = cls.tunables[k].check(f"loss.{k}", v)
        return out

    @classmethod
    def own_loss(cls, loss: Mapping[str, Any]) -> dict[str, Any]:
        """The keys of a space's `loss:` this objective declares (with a choice of objectives,
        a fixed key may belong to only some of them)."""
        return {k: v for k, v in loss.items() if k in cls.tunables}

    def teacher_features(self, teacher: TappedModel, x: Tensor) -> Features:
        # The teacher is frozen: no graph, eval mode (the engine keeps it there).
        with torch.no_grad():
            return teacher.forward_features(x)

    def forward(
        self, student: TappedModel, teacher: TappedModel, x: Tensor, y: Tensor, index: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.teacher_features(teacher, x)
        s = student.forward_features(x)
        terms = self.label_terms(s.logits, t.logits, y)
        return s.logits, with_own_terms(terms, self.own_terms(s, t, y, index))

    @classmethod
    def own_term_weights(cls) -> dict[str, str]:
        """Each term of the objective's own (its key in the terms dict) → the tunable that
        weighs it. By default one term, named after the objective, weighed by `weight`."""
        return {cls.name: "weight"} if "weight" in cls.tunables else {}

    @classmethod
    def term_weights(cls) -> dict[str, float]:
        """Each tunable that weighs a term of the loss (the label terms and its own) → its
        default: with every one of them 0 there is no loss to train on."""
        keys = [k for k in ("ce_weight", "kd_weight") if k in cls.tunables]
        keys += [k for k in cls.own_term_weights().values() if k not in keys]
        return {k: cls.tunables[k].default for k in keys}

    def own_terms(
        self, s: Features, t: Features, y: Tensor, index: Tensor | None
    ) -> dict[str, Tensor]:
        """The objective's own weighted terms; a term whose weight is 0 is not computed."""
        weight = self.hp.get("weight", 0.0)
        if weight <= 0:
            return {}
        return {self.name: weight * self.distill(s, t, y, index)}

    def label_terms(
        self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.hp["ce_weight"] > 0:
            terms["ce"] = self.hp["ce_weight"] * F.cross_entropy(student_logits.float(), y)
        if self.hp["kd_weight"] > 0:
            terms["kd"] = self.hp["kd_weight"] * kd_loss(
                student_logits, teacher_logits, self.hp["kd_temperature"]
            )
        return terms

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        """The objective's own term L_obj (unweighted)."""
        raise NotImplementedError


def with_own_terms(label: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """The label terms and the objective's own, refusing an own term under a label key.

    A dict update would let `own["kd"]` replace the real KD term without a trace.
    """
    clash = sorted(set(own) & set(LABEL_TERMS))
    if clash:
        raise ValueError(
            f"an objective's own term may not be named {clash[0]!r}: "
            f"it would replace the {clash[0]} label term"
        )
    return {**label, **own}


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available under its `name`.

    Refuses an objective whose own terms would take a label term's key (e.g. an objective
    named "kd" with a `weight`): its own term would overwrite the real KD term.
    """
    own = cls.own_term_weights()
    clash = sorted(set(own) & set(LABEL_TERMS))
    if clash:
        raise ValueError(
            f"objective {cls.name!r}: its own term {clash[0]!r} would overwrite "
            f"the {clash[0]} label term; name it otherwise or drop its weight"
        )
    missing = sorted(w for w in own.values() if w not in cls.tunables)
    if missing:
        raise ValueError(
            f"objective {cls.name!r}: a term is weighed by {missing[0]!r}, "
            f"which it does not declare"
        )
    return OBJECTIVES.add(cls.name, cls)


objective_names = OBJECTIVES.names
get_objective = OBJECTIVES.get
