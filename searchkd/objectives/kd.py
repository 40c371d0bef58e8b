"""kd — Hinton, Vinyals, Dean 2015: CE + KD on softened logits; no term of its own.

It declares only the label weights: a `weight` would weigh nothing, and a search over it
would only look like it changes kd trials.
"""

from __future__ import annotations

from .base import Objective, label_tunables, register_objective


@register_objective
class KD(Objective):
    name = "kd"
    tunables = label_tunables(ce_weight=0.1, kd_weight=0.9, kd_temperature=4.0)
