"""crd — contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

Student and teacher penultimate vectors go through linear heads to `dim` and are
L2-normalised. Two memory banks (one per network, N_train × dim) hold a momentum average
of every training sample's embedding. Each sample is contrasted with its own bank entry
(the positive) and K = `negatives` entries of samples from other classes (distinct, as
long as the other classes hold K samples; known from the first batch on) with the NCE
loss of the paper, score exp(v·m/τ)/Z with Z fixed from the first batch, once with the
student as anchor against the teacher bank and once the reverse; the two are summed.

The banks, the labels seen so far and Z are buffers: they live in the trial checkpoint, so
a resumed trial continues with the same memory and the same Z. The pieces (`LabelBook`,
`ContrastMemory`) are reused by cktf, which keeps one bank pair per layer pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import Features
from .base import Objective, ObjectiveContext, Tunable, common_tunables, register_objective

NCE_EPS = 1e-7  # the paper's code adds it to the NCE denominators


class LabelBook(nn.Module):
    """The label of every training index, to draw negatives from other classes.

    Built from the training labels when the dataset gives them up front (the engine passes
    them through `ObjectiveContext.train_labels`), so the first batch already draws from
    other classes only. Without them, entries hold -1 until `record` sees their batch; an
    unknown label cannot be shown to be the sample's class, so it stays eligible. When no
    index qualifies (every known label is the sample's) the draw falls back to uniform over
    all indices but the sample's own.
    """

    def __init__(self, num_train: int, labels: Tensor | None = None) -> None:
        super().__init__()
        known = torch.full((num_train,), -1, dtype=torch.long)
        if labels is not None:
            if labels.shape != (num_train,):
                raise ValueError(f"{labels.shape[0]} training labels for {num_train} samples")
            known = labels.detach().to(device="cpu", dtype=torch.long).clone()
        self.register_buffer("labels", known)

    @torch.no_grad()
    def record(self, index: Tensor, y: Tensor) -> None:
        self.labels.index_copy_(0, index.to(self.labels.device), y.to(self.labels))

    @torch.no_grad()
    def sample_negatives(self, index: Tensor, y: Tensor, k: int) -> Tensor:
        """B×k indices of other (or unknown) classes: k distinct ones when the sample's pool
        holds at least k (RepDistiller's CIFAR100InstanceSample draws without replacement
        then), with replacement only when the pool is smaller.

        Vectorised, without a host sync: sort the indices by stored label, so the indices of
        class c are one contiguous run [start_c, end_c) and the pool of a class-c sample is
        the positions [0, N − n_c) with that run skipped. Distinct positions are the k
        smallest of N uniform keys once the keys past the pool are pushed out of reach.
        """
        n = self.labels.numel()
        b = index.shape[0]
        dev = self.labels.device
        labels, order = torch.sort(self.labels, stable=True)
        y = y.to(labels)
        start = torch.searchsorted(labels, y, right=False).unsqueeze(1)  # B×1
        run = torch.searchsorted(labels, y, right=True).unsqueeze(1) - start
        others = n - run  # B×1: the pool's size
        u = torch.rand(b, k, device=dev)
        r = (u * others.clamp(min=1)).long()  # with replacement
        if k <= n:  # a pool can hold k distinct indices only then (a Python check: no sync)
            keys = torch.rand(b, n, device=dev)
            keys = keys.masked_fill(torch.arange(n, device=dev) >= others, 2.0)  # past the pool
            distinct = keys.topk(k, dim=1, largest=False, sorted=False).indices
            r = torch.where(others >= k, distinct, r)
        r = r.clamp(max=n - 1)
        drawn = order[torch.where(r >= start, r + run, r).clamp(max=n - 1)]
        # Fallback when every index holds the sample's class: uniform over the other N−1.
        own = index.to(dev).unsqueeze(1)
        anyone = (u * max(n - 1, 1)).long().clamp(max=max(n - 2, 0))
        anyone = anyone + (anyone >= own).long()
        return torch.where(others > 0, drawn, anyone.clamp(max=n - 1))


def nce_loss(scores: Tensor, log_z: Tensor, tau: float, num_train: int) -> Tensor:
    """The paper's NCE loss for scores B×(1+K) (column 0 the positive), summed over the
    sample's terms and averaged over the batch.

    P = exp(s/τ)/Z; a positive contributes log P/(P + K·Pn + ε), each negative
    log K·Pn/(P + K·Pn + ε), with noise Pn = 1/N. Computed in log space so a small τ
    cannot overflow.
    """
    k = scores.shape[1] - 1
    log_p = scores.float() / tau - log_z
    noise = k / num_train
    log_c = torch.full_like(log_p, math.log(noise + NCE_EPS))
    log_den = torch.logaddexp(log_p, log_c)
    log_d1 = log_p[:, 0] - log_den[:, 0]
    loss = -log_d1.sum()
    if k > 0:
        log_d0 = math.log(noise) - log_den[:, 1:]
        loss = loss - log_d0.sum()
    return loss / scores.shape[0]


class ContrastMemory(nn.Module):
    """A student bank and a teacher bank with their fixed normalisers Z (log Z kept)."""

    def __init__(self, num_train: int, dim: int, tau: float, momentum: float) -> None:
        super().__init__()
        self.num_train, self.tau, self.momentum = num_train, tau, momentum
        std = 1.0 / math.sqrt(dim / 3)  # the paper's init: uniform in ±1/√(dim/3)
        self.register_buffer("student_bank", torch.rand(num_train, dim).mul_(2 * std).add_(-std))
        self.register_buffer("teacher_bank", torch.rand(num_train, dim).mul_(2 * std).add_(-std))
        self.register_buffer("log_z", torch.zeros(2))  # [student anchor, teacher anchor]
        self.register_buffer("z_ready", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def scores(bank: Tensor, v: Tensor, idx: Tensor) -> Tensor:
        """v_b · bank[idx_b,k] → B×(1+K). When the draws cover the bank anyway, one matmul
        against the whole bank is cheaper than materialising B×(1+K)×dim rows."""
        if idx.numel() >= bank.shape[0]:
            return (v @ bank.t()).gather(1, idx)
        return torch.einsum("bkd,bd->bk", bank[idx], v)

    def forward(self, v_s: Tensor, v_t: Tensor, index: Tensor, negatives: Tensor) -> Tensor:
        """Both anchors' NCE loss (summed); updates the banks when training."""
        v_s, v_t = v_s.float(), v_t.float()
        idx = torch.cat([index.view(-1, 1), negatives], dim=1)
        # fp32 scores: at τ = 0.07 a bf16 dot product's rounding would be ~6% of a logit.
        with torch.autocast(v_s.device.type, enabled=False):
            # Student anchor against the teacher bank, teacher anchor against the student bank.
            s_scores = self.scores(self.teacher_bank, v_s, idx)
            t_scores = self.scores(self.student_bank, v_t, idx)
        with torch.no_grad():
            # Z = mean(exp(s/τ)) · N from the first batch, then frozen (no host sync).
            first = torch.stack([s_scores, t_scores]).flatten(1) / self.tau
            first = (
                torch.logsumexp(first, dim=1) - math.log(first.shape[1]) + math.log(self.num_train)
            )
            self.log_z.copy_(torch.where(self.z_ready, self.log_z, first))
            self.z_ready.fill_(True)
        loss = nce_loss(s_scores, self.log_z[0], self.tau, self.num_train)
        loss = loss + nce_loss(t_scores, self.log_z[1], self.tau, self.num_train)
        if self.training:
            self.update(index, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def update(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """m ← μm + (1−μ)v, renormalised. Out of place: this step's graph still holds the
        old banks (the whole-bank matmul saves them for backward)."""
        for name, v in (("student_bank", v_s), ("teacher_bank", v_t)):
            bank = getattr(self, name)
            rows = F.normalize(bank[index] * self.momentum + v * (1 - self.momentum), dim=1)
            setattr(self, name, bank.index_copy(0, index, rows))


def clamp_negatives(k: int, num_train: int) -> int:
    """At most N−1 negatives exist; tiny datasets (tests, digits) get that many."""
    return max(0, min(k, num_train - 1))


def require_index(index: Tensor | None, who: str) -> Tensor:
    if index is None:
        raise ValueError(f"{who} keeps a memory bank and needs the dataset's sample indices")
    return index


@register_objective
class CRD(Objective):
    name = "crd"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=0.0, kd_temperature=4.0, weight=0.8),
        "tau": Tunable(
            "float", 0.07, "NCE temperature", {"float": [0.03, 0.3], "log": True}, low=1e-3
        ),
        "dim": Tunable(
            "int",
            128,
            "embedding dimension of both heads and banks",
            {"choice": [64, 128, 256]},
            low=1,
        ),
        "negatives": Tunable(
            "int",
            16384,
            "negatives per sample, from other classes (clamped to N_train−1)",
            {"choice": [4096, 8192, 16384]},
            low=0,
        ),
        "momentum": Tunable(
            "float",
            0.5,
            "memory bank momentum μ in m ← μm + (1−μ)v",
            {"float": [0.0, 0.9]},
            low=0.0,
            high=0.999,
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
        dim = self.hp["dim"]
        self.negatives = clamp_negatives(self.hp["negatives"], ctx.num_train)
        self.student_heads = nn.ModuleDict({"pool": nn.Linear(student_features.pool.shape[1], dim)})
        self.teacher_heads = nn.ModuleDict({"pool": nn.Linear(teacher_features.pool.shape[1], dim)})
        self.book = LabelBook(ctx.num_train, ctx.train_labels)
        self.memory = ContrastMemory(ctx.num_train, dim, self.hp["tau"], self.hp["momentum"])

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        index = require_index(index, "crd")
        v_s = F.normalize(self.student_heads["pool"](s.pool).float(), dim=1)
        v_t = F.normalize(self.teacher_heads["pool"](t.pool).float(), dim=1)
        self.book.record(index, y)
        negatives = self.book.sample_negatives(index, y, self.negatives)
        return self.memory(v_s, v_t, index, negatives)
