"""msd — contrastive distillation with multi-scale feature decoupling (MSDCRD, Wang et al. 2025).

Each tapped feature map is decoupled into local vectors by pooling it at several scales;
every local vector gets its own projection and is contrasted:
- sample-wise: cell r of sample i (student) against cell r of every sample (teacher):
  the positive is the same sample (`positives: instance`) or any same-label sample
  (`positives: class`, the paper's sample categorisation);
- feature-wise: within one sample, student cell r against all teacher cells of that sample
  (positive: the same cell), at scales with more than one cell, weighted by `feature_weight`.
Both directions (student→teacher and teacher→student), averaged over cells, scales and taps.
Single batch only: no memory bank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import Features
from .base import Objective, Tunable, common_tunables, register_objective
from .contrast import symmetric_info_nce


def decouple(fmap: Tensor, scale: int, pooling: str) -> Tensor:
    """Pool a B×C×H×W map into local cells: `grid` = s×s adaptive average pool; `sliding` =
    overlapping windows of size ⌈H/s⌉ with stride ⌈H/(2s)⌉."""
    if pooling == "grid":
        return F.adaptive_avg_pool2d(fmap, scale)
    h, w = fmap.shape[-2:]
    kernel = (math.ceil(h / scale), math.ceil(w / scale))
    stride = (math.ceil(h / (2 * scale)), math.ceil(w / (2 * scale)))
    return F.avg_pool2d(fmap, kernel, stride)


def match_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps down to the smaller's spatial size."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    size = (min(ha[0], hb[0]), min(ha[1], hb[1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def cells(fmap: Tensor) -> Tensor:
    """B×D×h×w → R×B×D (R = h·w cells), each local vector L2-normalised."""
    return F.normalize(fmap.flatten(2).permute(2, 0, 1), dim=-1)


@register_objective
class MSD(Objective):
    name = "msd"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=1.0, kd_temperature=4.0, weight=1.0),
        "tau": Tunable(
            "float", 0.1, "InfoNCE temperature", {"float": [0.03, 0.5], "log": True}, low=1e-4
        ),
        "scales": Tunable(
            "ints",
            [1, 2, 4],
            "pooling scales s (s×s cells each)",
            {"choice": [[1], [1, 2], [1, 2, 4], [2, 4]]},
        ),
        "pooling": Tunable(
            "str",
            "grid",
            "grid: s×s adaptive pool; sliding: overlapping windows",
            {"choice": ["grid", "sliding"]},
            choices=("grid", "sliding"),
        ),
        "layers": Tunable(
            "int", 1, "how many of the last stages are tapped", {"int": [1, 3]}, low=1
        ),
        "dim": Tunable(
            "int",
            128,
            "projection dimension of every local vector",
            {"choice": [64, 128, 256]},
            low=1,
        ),
        "feature_weight": Tunable(
            "float",
            1.0,
            "weight of the feature-wise (within-sample) term",
            {"float": [0.0, 2.0]},
            low=0.0,
        ),
        "positives": Tunable(
            "str",
            "instance",
            "instance: same sample; class: same label too",
            {"choice": ["instance", "class"]},
            choices=("instance", "class"),
        ),
    }

    def __init__(self, hp, teacher_features: Features, student_features: Features, ctx) -> None:
        super().__init__(hp, teacher_features, student_features, ctx)
        n_layers = min(
            self.hp["layers"], len(teacher_features.stages), len(student_features.stages)
        )
        self.taps = list(range(-n_layers, 0))
        dim = self.hp["dim"]
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()
        # A scale finer than the (size-matched) map would only copy cells, and contrasting a
        # cell with its own copies teaches nothing: such scales are capped at the map's side.
        self.tap_scales: dict[int, list[int]] = {}
        for tap in self.taps:
            cs, ct = student_features.stages[tap].shape[1], teacher_features.stages[tap].shape[1]
            side = min(
                *student_features.stages[tap].shape[-2:], *teacher_features.stages[tap].shape[-2:]
            )
            self.tap_scales[tap] = sorted({min(s, side) for s in self.hp["scales"]})
            for s in self.tap_scales[tap]:
                key = f"tap{tap}_s{s}"
                self.student_heads[key] = nn.Conv2d(cs, dim, 1)
                self.teacher_heads[key] = nn.Conv2d(ct, dim, 1)

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        tau = self.hp["tau"]
        positives = (y[:, None] == y[None, :]) if self.hp["positives"] == "class" else None
        sample_terms, feature_terms = [], []
        for tap in self.taps:
            fs, ft = match_size(s.stages[tap], t.stages[tap])
            for scale in self.tap_scales[tap]:
                key = f"tap{tap}_s{scale}"
                zs = cells(self.student_heads[key](decouple(fs, scale, self.hp["pooling"])))
                zt = cells(self.teacher_heads[key](decouple(ft, scale, self.hp["pooling"])))
                # Sample-wise: for every cell, contrast across the batch (R×B×B logits).
                sample_terms.append(symmetric_info_nce(zs, zt, tau, positives))
                if zs.shape[0] > 1:
                    # Feature-wise: for every sample, contrast its cells (B×R×R logits).
                    feature_terms.append(
                        symmetric_info_nce(zs.transpose(0, 1), zt.transpose(0, 1), tau)
                    )
        loss = torch.stack(sample_terms).mean()
        if feature_terms and self.hp["feature_weight"] > 0:
            loss = loss + self.hp["feature_weight"] * torch.stack(feature_terms).mean()
        return loss
