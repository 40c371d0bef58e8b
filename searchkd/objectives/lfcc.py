"""lfcc — low-frequency contrastive alignment for heterogeneous pairs (seed 002, LFCC).

A CNN, a ViT and an MLP-Mixer disagree most in the high frequencies of their feature maps
(locality, patch borders); their low-frequency content is much more alike. So each tapped
map is low-pass filtered at several strengths, both networks' filtered maps are brought to
the smallest spatial size they share (the "compact space"), projected (1×1 conv → flatten →
linear → ‖·‖), and aligned sample by sample with a symmetric InfoNCE across the batch:
a student vector must be closer to its own sample's teacher vector than to any other's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import Features
from .base import Objective, ObjectiveContext, Tunable, common_tunables, register_objective
from .contrast import symmetric_info_nce
from .msd import match_size


def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Orthonormal DCT-II as an n×n matrix D (coefficients = D x): plain torch, no scipy."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype or torch.get_default_dtype())


def dct_lowpass(fmap: Tensor, size: tuple[int, int]) -> Tensor:
    """The lowest size[0]×size[1] 2-D DCT coefficients of every channel: B×C×h×w."""
    h, w = fmap.shape[-2:]
    dh = dct_matrix(h, fmap.device, fmap.dtype)[: size[0]]
    dw = dct_matrix(w, fmap.device, fmap.dtype)[: size[1]]
    return torch.einsum("kh,bchw,lw->bckl", dh, fmap, dw)


def _avgpool_pair(fs: Tensor, ft: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average-pool each map with kernel = stride = k (capped at the map, so a coarse filter
    on a small map becomes a global pool), then pool the larger down to the smaller."""

    def pool(f: Tensor) -> Tensor:
        h, w = f.shape[-2:]
        kernel = (min(k, h), min(k, w))
        return F.avg_pool2d(f, kernel, kernel)

    return match_size(pool(fs), pool(ft))


def _dct_pair(fs: Tensor, ft: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the lowest k×k DCT coefficients of each map; in the frequency domain the compact
    space is the coefficient block both maps have (a smaller map has fewer frequencies)."""
    size = (min(k, fs.shape[-2], ft.shape[-2]), min(k, fs.shape[-1], ft.shape[-1]))
    return dct_lowpass(fs, size), dct_lowpass(ft, size)


FILTERS: dict[str, Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]] = {
    "avgpool": _avgpool_pair,
    "dct": _dct_pair,
}


def projection(channels: int, size: tuple[int, int], dim: int) -> nn.Sequential:
    """1×1 conv to `dim` → flatten → linear to `dim` (normalised by the caller)."""
    return nn.Sequential(
        nn.Conv2d(channels, dim, 1), nn.Flatten(), nn.Linear(dim * size[0] * size[1], dim)
    )


@register_objective
class LFCC(Objective):
    name = "lfcc"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=1.0, kd_temperature=4.0, weight=1.0),
        "tau": Tunable("float", 0.1, "InfoNCE temperature", {"float": [0.03, 0.5], "log": True},
                       low=1e-4),
        "scales": Tunable("ints", [1, 2, 4], "low-pass kernels k (avgpool k×k / lowest k×k DCT)",
                          {"choice": [[1], [1, 2], [1, 2, 4], [2, 4]]}),
        "filter": Tunable("str", "avgpool", "avgpool: k×k average pool; dct: lowest k×k DCT "
                          "coefficients", {"choice": ["avgpool", "dct"]},
                          choices=tuple(FILTERS)),
        "layers": Tunable("int", 2, "how many of the last stages are tapped",
                          {"int": [1, 3]}, low=1),
        "dim": Tunable("int", 256, "projection dimension", {"choice": [128, 256, 512]}, low=1),
    }

    def __init__(
        self,
        hp: Mapping[str, Any],
        teacher_features: Features,
        student_features: Features,
        ctx: ObjectiveContext,
    ) -> None:
        super().__init__(hp, teacher_features, student_features, ctx)
        n_layers = min(self.hp["layers"], len(teacher_features.stages), len(student_features.stages))
        self.taps = list(range(-n_layers, 0))
        self.filter = FILTERS[self.hp["filter"]]
        dim = self.hp["dim"]
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()
        with torch.no_grad():
            for tap in self.taps:
                for k in self.hp["scales"]:
                    fs, ft = self.filter(student_features.stages[tap], teacher_features.stages[tap], k)
                    key = f"tap{tap}_k{k}"
                    self.student_heads[key] = projection(fs.shape[1], fs.shape[-2:], dim)
                    self.teacher_heads[key] = projection(ft.shape[1], ft.shape[-2:], dim)

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        terms = []
        for tap in self.taps:
            for k in self.hp["scales"]:
                fs, ft = self.filter(s.stages[tap], t.stages[tap], k)
                key = f"tap{tap}_k{k}"
                zs = F.normalize(self.student_heads[key](fs).float(), dim=1)
                zt = F.normalize(self.teacher_heads[key](ft).float(), dim=1)
                terms.append(symmetric_info_nce(zs, zt, self.hp["tau"]))
        return torch.stack(terms).mean()
