"""cktf — contrastive knowledge transfer over intermediate layers (CKTF, Zhao et al., ICASSP 2023).

CRD contrasts only the penultimate vectors; CKTF adds one contrastive term per
intermediate layer pair so the student also learns the teacher's structure along the way:
the stem, every stage and the final pooled feature. Every pair has its own heads and either
its own CRD memory banks (`memory: bank`, the NCE loss of crd) or an in-batch InfoNCE
(`memory: batch`: no dataset indices, no banks). The loss is

    L = CE + weight · L_final + inter_weight · Σ_l L_l

with the two weights independent (0.8 and 0.1 in the authors' CIFAR-100 scripts), reported
as two terms, `cktf` and `cktf_inter`.

What enters each pair's heads follows the authors' code (a RepDistiller fork):
- a stage map is normalised over the batch dimension (each channel-position across the
  batch, `F.normalize(·, dim=0)`), then average-pooled with kernel = stride = `pool_kernel`
  and flattened: on 32×32 CIFAR ResNets/WRNs kernel 8 keeps 4×4, 2×2 and 1×1 grids of the
  three stages (0 pools globally, what they use for VGG and ImageNet ResNets);
- the stem map is pooled and flattened the same way but not normalised over the batch (in
  their code it does not pass the module that normalises the stage maps);
- the narrower side of a stem or stage pair is zero-padded to the wider's channel count
  (the student, for every usual pair); the final pooled vectors enter as they are.

Stage pairing: the models expose one output per stage, the last block's. The authors pair
each student stage with the last block of the teacher's stage by default (`Last`); that is
the pairing here. Their alternatives choose another block inside the teacher's stage, which
the models do not expose, so there is no knob for it. A teacher with more stages than the
student (a VGG against a 3-stage ResNet) is split into as many contiguous groups as the
student has stages, by relative depth, and the last stage of each group is paired; a
shallower teacher shares its stage at the same relative depth.
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


def teacher_stage_for(j: int, n_student: int, n_teacher: int) -> int:
    """The teacher stage paired with student stage j: the last of its relative-depth group."""
    group = [i for i in range(n_teacher) if i * n_student // n_teacher == j]
    return group[-1] if group else j * n_teacher // n_student


def layer_pairs(s: Features, t: Features) -> list[tuple[str, Tensor, Tensor]]:
    """(name, student tensor, teacher tensor) for the stem, each student stage and the final
    pooled feature, as the models return them (`pair_input` prepares them)."""
    n_s, n_t = len(s.stages), len(t.stages)
    pairs = [("stem", s.stem, t.stem)]
    for j in range(n_s):
        pairs.append((f"stage{j}", s.stages[j], t.stages[teacher_stage_for(j, n_s, n_t)]))
    pairs.append(("final", s.pool, t.pool))
    return pairs


def grid_pool(f: Tensor, kernel: int) -> Tensor:
    """Average-pool a map with kernel = stride = `kernel` and flatten (c, y, x); kernel 0, or
    a map no larger than the kernel, is pooled globally. A vector passes through."""
    if f.dim() == 2:
        return f
    h, w = f.shape[-2:]
    size = (h, w) if kernel <= 0 else (min(kernel, h), min(kernel, w))
    return F.avg_pool2d(f, size, size, ceil_mode=True).flatten(1)


def pair_input(name: str, f: Tensor, channels: int, kernel: int) -> Tensor:
    """What one side of a pair feeds its head: a stage map normalised over the batch, the
    stem as it is; either pooled to a grid with channels zero-padded to `channels`."""
    if name == "final":
        return f
    if name != "stem":
        f = F.normalize(f.float(), dim=0)
    if f.shape[1] < channels:
        f = F.pad(f, (0, 0, 0, 0, 0, channels - f.shape[1]))
    return grid_pool(f, kernel)


@register_objective
class CKTF(Objective):
    name = "cktf"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=0.0, kd_temperature=4.0),
        "weight": Tunable(
            "float",
            0.8,
            "weight of the final pair's term L_final",
            {"float": [0.1, 10.0], "log": True},
            low=0.0,
        ),
        "inter_weight": Tunable(
            "float",
            0.1,
            "weight θ of the intermediate layer terms Σ_l L_l "
            "(independent of `weight`, which weighs the final pair's)",
            {"float": [0.01, 1.0], "log": True},
            low=0.0,
        ),
        "tau": Tunable(
            "float", 0.1, "contrastive temperature", {"float": [0.03, 0.5], "log": True}, low=1e-3
        ),
        "dim": Tunable(
            "int",
            128,
            "embedding dimension of every pair's heads",
            {"choice": [64, 128, 256]},
            low=1,
        ),
        "negatives": Tunable(
            "int",
            16384,
            "bank negatives per sample, from other classes (clamped to N_train−1)",
            {"choice": [4096, 8192, 16384]},
            low=0,
        ),
        "memory": Tunable(
            "str",
            "bank",
            "bank: CRD memory banks per pair; batch: in-batch InfoNCE",
            {"choice": ["bank", "batch"]},
            choices=("bank", "batch"),
        ),
        "pool_kernel": Tunable(
            "int",
            8,
            "average-pool kernel of the stem and stage maps before "
            "their heads (8: the authors' grids on 32×32 ResNets/WRNs; 0: "
            "global)",
            {"choice": [0, 4, 8]},
            low=0,
        ),
    }

    def __init__(
        self,
        hp: Mapping[str, Any],
        teacher_features: Features,
        student_features: Features,
        ctx: ObjectiveContext,
    ) -> None:
        super().__init__(hp, teacher_features, student_features, ctx)
        dim, kernel = self.hp["dim"], self.hp["pool_kernel"]
        self.uses_bank = self.hp["memory"] == "bank"
        self.negatives = clamp_negatives(self.hp["negatives"], ctx.num_train)
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()
        self.memories = nn.ModuleDict()
        self.channels: dict[str, int] = {}
        with torch.no_grad():
            for name, fs, ft in layer_pairs(student_features, teacher_features):
                self.channels[name] = max(fs.shape[1], ft.shape[1])
                vs = pair_input(name, fs, self.channels[name], kernel)
                vt = pair_input(name, ft, self.channels[name], kernel)
                self.student_heads[name] = nn.Linear(vs.shape[1], dim)
                self.teacher_heads[name] = nn.Linear(vt.shape[1], dim)
                if self.uses_bank:
                    self.memories[name] = ContrastMemory(
                        ctx.num_train, dim, self.hp["tau"], CRD_MOMENTUM
                    )
        # One label book for all pairs: the negatives of a sample are shared across layers.
        self.book = LabelBook(ctx.num_train, ctx.train_labels) if self.uses_bank else None

    @classmethod
    def own_term_weights(cls) -> dict[str, str]:
        return {"cktf": "weight", "cktf_inter": "inter_weight"}

    def pair_loss(
        self, name: str, fs: Tensor, ft: Tensor, index: Tensor | None, negatives: Tensor | None
    ) -> Tensor:
        """One layer pair's contrastive loss (CRD's NCE against banks, or in-batch InfoNCE)."""
        kernel, channels = self.hp["pool_kernel"], self.channels[name]
        v_s = F.normalize(
            self.student_heads[name](pair_input(name, fs, channels, kernel)).float(), dim=1
        )
        v_t = F.normalize(
            self.teacher_heads[name](pair_input(name, ft, channels, kernel)).float(), dim=1
        )
        if negatives is not None and index is not None:
            return self.memories[name](v_s, v_t, index, negatives)
        return symmetric_info_nce(v_s, v_t, self.hp["tau"])

    def own_terms(
        self, s: Features, t: Features, y: Tensor, index: Tensor | None
    ) -> dict[str, Tensor]:
        weights = {"final": self.hp["weight"], "inter": self.hp["inter_weight"]}
        if all(w <= 0 for w in weights.values()):
            return {}
        negatives = None
        if self.book is not None:
            index = require_index(index, "cktf with memory: bank")
            self.book.record(index, y)
            negatives = self.book.sample_negatives(index, y, self.negatives)
        final, inter = [], []
        for name, fs, ft in layer_pairs(s, t):
            group = final if name == "final" else inter
            if weights["final" if name == "final" else "inter"] > 0:
                group.append(self.pair_loss(name, fs, ft, index, negatives))
        terms: dict[str, Tensor] = {}
        if final:
            terms["cktf"] = weights["final"] * final[0]
        if inter:
            terms["cktf_inter"] = weights["inter"] * torch.stack(inter).sum()
        return terms
