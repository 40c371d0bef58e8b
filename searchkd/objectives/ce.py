"""ce — the student alone, cross-entropy on the labels.

The baseline every objective must beat, and the recipe teachers are trained with. It
needs no teacher.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.base import TappedModel
from .base import Objective, label_tunables, register_objective


@register_objective
class CE(Objective):
    name = "ce"
    needs_teacher = False
    tunables = {"ce_weight": label_tunables()["ce_weight"]}

    def forward(
        self,
        student: TappedModel,
        teacher: TappedModel | None,
        x: Tensor,
        y: Tensor,
        index: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = student(x)
        return logits, {"ce": self.hp["ce_weight"] * F.cross_entropy(logits.float(), y)}
