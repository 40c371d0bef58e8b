"""lfcc — low-frequency contrastive alignment for heterogeneous pairs (LFCC, Wu et al. 2024).

A CNN, a ViT and an MLP-Mixer disagree most in the high frequencies of their feature maps
(locality, patch borders); their low-frequency content is much more alike. So each tapped
map is low-pass filtered at several strengths, projected (1×1 conv → flatten → linear → ‖·‖),
and aligned sample by sample with a symmetric InfoNCE across the batch: a student vector
must be closer to its own sample's teacher vector than to any other's.

`scales` means the same for both filters: the c×c grid kept of every channel, the c×c
adaptive average pool (`avgpool`) or the lowest c×c 2-D DCT coefficients (`dct`). Both
networks' maps come out c×c, which is the compact space they are aligned in, whatever their
own sizes. A c at or above a tap's smaller map side would keep the whole map (an all-pass
filter, no low-pass at all) and is dropped: a tap uses the listed sizes below its side and
only those (1 is not added), or the global mean (c = 1) alone when none is below it.

Head size: a head's linear layer sees about `dim` numbers whatever c is (its 1×1 conv gives
each of the c×c cells ⌈dim/c²⌉ channels), so the heads cost O(C·dim + dim²) per tap and
scale, not O(dim² · map area); `objective_params` in each row reports them.
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


def dct_matrix(
    n: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Orthonormal DCT-II as an n×n matrix D (coefficients = D x): plain torch, no scipy."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype or torch.get_default_dtype())


def dct_lowpass(fmap: Tensor, size: tuple[int, int]) -> Tensor:
    """The lowest size[0]×size[1] orthonormal 2-D DCT coefficients of every channel: B×C×h×w."""
    h, w = fmap.shape[-2:]
    dh = dct_matrix(h, fmap.device, fmap.dtype)[: size[0]]
    dw = dct_matrix(w, fmap.device, fmap.dtype)[: size[1]]
    return torch.einsum("kh,bchw,lw->bckl", dh, fmap, dw)


def grid(fmap: Tensor, c: int) -> tuple[int, int]:
    return min(c, fmap.shape[-2]), min(c, fmap.shape[-1])


def avgpool_filter(fmap: Tensor, c: int) -> Tensor:
    """The c×c grid of block means."""
    return F.adaptive_avg_pool2d(fmap, grid(fmap, c))


def dct_filter(fmap: Tensor, c: int) -> Tensor:
    """The lowest c×c DCT coefficients, divided by √(HW) so the first is the map's mean: maps
    of different sizes give comparable coefficients, and c = 1 equals avgpool's c = 1."""
    h, w = fmap.shape[-2:]
    return dct_lowpass(fmap, grid(fmap, c)) / math.sqrt(h * w)


FILTERS: dict[str, Callable[[Tensor, int], Tensor]] = {"avgpool": avgpool_filter, "dct": dct_filter}


def tap_scales(scales: list[int], fs: Tensor, ft: Tensor) -> list[int]:
    """The grid sizes used at a tap: those below the smaller map side (a larger one would keep
    the whole map), or the global mean alone when none is."""
    side = min(*fs.shape[-2:], *ft.shape[-2:])
    return sorted({c for c in scales if c < side}) or [1]


def projection(channels: int, cells: int, dim: int) -> nn.Sequential:
    """1×1 conv to ⌈dim/cells⌉ channels per cell → flatten (≈ dim numbers, the grid kept) →
    linear to `dim` (normalised by the caller)."""
    per_cell = -(-dim // cells)
    return nn.Sequential(
        nn.Conv2d(channels, per_cell, 1), nn.Flatten(), nn.Linear(per_cell * cells, dim)
    )


@register_objective
class LFCC(Objective):
    name = "lfcc"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=1.0, kd_temperature=4.0, weight=1.0),
        "tau": Tunable(
            "float", 0.1, "InfoNCE temperature", {"float": [0.03, 0.5], "log": True}, low=1e-4
        ),
        "scales": Tunable(
            "ints",
            [1, 2, 4],
            "grid sizes c kept of each map (c×c); c at or "
            "above a tap's map side is dropped (it would keep everything)",
            {"choice": [[1], [1, 2], [1, 2, 4], [2, 4]]},
        ),
        "filter": Tunable(
            "str",
            "avgpool",
            "avgpool: c×c adaptive average pool; dct: lowest c×c DCT coefficients",
            {"choice": ["avgpool", "dct"]},
            choices=tuple(FILTERS),
        ),
        "layers": Tunable(
            "int", 2, "how many of the last stages are tapped", {"int": [1, 3]}, low=1
        ),
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
        n_layers = min(
            self.hp["layers"], len(teacher_features.stages), len(student_features.stages)
        )
        self.taps = list(range(-n_layers, 0))
        self.filter = FILTERS[self.hp["filter"]]
        dim = self.hp["dim"]
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()
        self.scales: dict[int, list[int]] = {}
        for tap in self.taps:
            fs, ft = student_features.stages[tap], teacher_features.stages[tap]
            self.scales[tap] = tap_scales(self.hp["scales"], fs, ft)
            for c in self.scales[tap]:
                key = f"tap{tap}_c{c}"
                self.student_heads[key] = projection(fs.shape[1], math.prod(grid(fs, c)), dim)
                self.teacher_heads[key] = projection(ft.shape[1], math.prod(grid(ft, c)), dim)

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        terms = []
        for tap in self.taps:
            for c in self.scales[tap]:
                key = f"tap{tap}_c{c}"
                zs = F.normalize(
                    self.student_heads[key](self.filter(s.stages[tap], c)).float(), dim=1
                )
                zt = F.normalize(
                    self.teacher_heads[key](self.filter(t.stages[tap], c)).float(), dim=1
                )
                terms.append(symmetric_info_nce(zs, zt, self.hp["tau"]))
        return torch.stack(terms).mean()
