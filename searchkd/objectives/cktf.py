"""cktf — contrastive knowledge transfer over intermediate layers (seed 003, CKTF).

CRD contrasts only the penultimate vectors; CKTF adds one contrastive term per
intermediate layer pair so the student also learns the teacher's structure along the way:
the stem, every stage and the final pooled feature. Each map is global-average-pooled to a
vector, the narrower side is zero-padded to the wider's channel count (the teacher's, for
every usual pair), and every pair has its own heads and either its own CRD memory banks
(`memory: bank`, the NCE loss of crd) or an in-batch InfoNCE (`memory: batch`: no dataset
indices, no banks). L_obj = L_final + inter_weight · Σ_l L_l.

Stage pairing and `teacher_block`: the models expose one output per stage, not per block,
so "which teacher block feeds a student stage" is honoured at stage granularity. The
teacher's stages are split into as many contiguous groups as the student has stages (by
relative depth); student stage j is paired with the last (`last`) or the first (`first`)
stage of its group. With equal stage counts (every CIFAR ResNet/WRN pair) each group has
one stage and the two settings coincide; they differ when the teacher has more stages
(e.g. a VGG or a ViT tapped per block group against a 3-stage ResNet). When the teacher has
fewer stages, student stages share the teacher stage at the same relative depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import Features
from .base import Objective, ObjectiveContext, Tunable, common_tunables, register_objective
from .contrast import symmetric_info_nce
from .crd import CRD, ContrastMemory, LabelBook, clamp_negatives, require_index

CRD_MOMENTUM = CRD.tunables["momentum"].default  # cktf's banks behave as crd's


def teacher_stage_for(j: int, n_student: int, n_teacher: int, block: str) -> int:
    """The teacher stage paired with student stage j (see the module docstring)."""
    group = [i for i in range(n_teacher) if i * n_student // n_teacher == j]
    if not group:
        return j * n_teacher // n_student
    return group[-1] if block == "last" else group[0]


def layer_pairs(s: Features, t: Features, block: str) -> list[tuple[str, Tensor, Tensor]]:
    """(name, student tensor, teacher tensor) for the stem, each student stage and the final
    pooled feature; maps are returned as they are (pooled by `to_vector`)."""
    n_s, n_t = len(s.stages), len(t.stages)
    pairs = [("stem", s.stem, t.stem)]
    for j in range(n_s):
        pairs.append((f"stage{j}", s.stages[j], t.stages[teacher_stage_for(j, n_s, n_t, block)]))
    pairs.append(("final", s.pool, t.pool))
    return pairs


def to_vector(f: Tensor, channels: int) -> Tensor:
    """Global average pool a map (a vector passes through), zero-padded to `channels`."""
    v = f.flatten(2).mean(-1) if f.dim() > 2 else f
    return F.pad(v, (0, channels - v.shape[1])) if v.shape[1] < channels else v


@register_objective
class CKTF(Objective):
    name = "cktf"
    # True for the class (the engine may ask before building it, and the default is a bank);
    # each instance says what it really needs, and batch mode ignores the index.
    needs_index = True
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=0.0, kd_temperature=4.0, weight=0.8),
        "inter_weight": Tunable("float", 0.1, "weight of the intermediate layer terms Σ_l L_l",
                                {"float": [0.01, 1.0], "log": True}, low=0.0),
        "tau": Tunable("float", 0.1, "contrastive temperature", {"float": [0.03, 0.5], "log": True},
                       low=1e-3),
        "dim": Tunable("int", 128, "embedding dimension of every pair's heads",
                       {"choice": [64, 128, 256]}, low=1),
        "negatives": Tunable("int", 16384, "bank negatives per sample, from other classes "
                             "(clamped to N_train−1)", {"choice": [4096, 8192, 16384]}, low=0),
        "memory": Tunable("str", "bank", "bank: CRD memory banks per pair; batch: in-batch "
                          "InfoNCE", {"choice": ["bank", "batch"]}, choices=("bank", "batch")),
        "teacher_block": Tunable("str", "last", "teacher stage paired with each student stage "
                                 "when the teacher has more", {"choice": ["last", "first"]},
                                 choices=("last", "first")),
    }

    def __init__(
        self,
        hp: Mapping[str, Any],
        teacher_features: Features,
        student_features: Features,
        ctx: ObjectiveContext,
    ) -> None:
        super().__init__(hp, teacher_features, student_features, ctx)
        dim = self.hp["dim"]
        self.needs_index = self.hp["memory"] == "bank"
        self.negatives = clamp_negatives(self.hp["negatives"], ctx.num_train)
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()
        self.memories = nn.ModuleDict()
        self.pair_names: list[str] = []
        for name, fs, ft in layer_pairs(student_features, teacher_features, self.hp["teacher_block"]):
            channels = max(fs.shape[1], ft.shape[1])
            self.student_heads[name] = nn.Linear(channels, dim)
            self.teacher_heads[name] = nn.Linear(channels, dim)
            if self.needs_index:
                self.memories[name] = ContrastMemory(ctx.num_train, dim, self.hp["tau"], CRD_MOMENTUM)
            self.pair_names.append(name)
        # One label book for all pairs: the negatives of a sample are shared across layers.
        self.book = LabelBook(ctx.num_train, ctx.train_labels) if self.needs_index else None

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        negatives = None
        if self.book is not None:
            index = require_index(index, "cktf with memory: bank")
            self.book.record(index, y)
            negatives = self.book.sample_negatives(index, y, self.negatives)
        losses: dict[str, Tensor] = {}
        for name, fs, ft in layer_pairs(s, t, self.hp["teacher_block"]):
            channels = self.student_heads[name].in_features
            v_s = F.normalize(self.student_heads[name](to_vector(fs, channels)).float(), dim=1)
            v_t = F.normalize(self.teacher_heads[name](to_vector(ft, channels)).float(), dim=1)
            if negatives is not None:
                losses[name] = self.memories[name](v_s, v_t, index, negatives)
            else:
                losses[name] = symmetric_info_nce(v_s, v_t, self.hp["tau"])
        inter = torch.stack([v for k, v in losses.items() if k != "final"]).sum()
        return losses["final"] + self.hp["inter_weight"] * inter
