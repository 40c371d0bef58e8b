"""stkd — similarity transfer with mixup (STKD, Zhao et al. 2021).

Mixup makes virtual samples that lie between two classes, so the teacher's outputs on them
carry similarities through "incorrect" classes. The student learns them three ways: CE on
the mixed labels, KD on the virtual samples, and the similarity-transfer term L_obj, which
matches how the samples of a batch relate to each other (row-softmaxed inter-sample
similarity matrices of the outputs softened at `sim_softmax_temperature`), not each sample's
output alone. That temperature is its own tunable, not kd_temperature: the KD term and the
similarity term are different quantities and a search should move them separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.base import Features, TappedModel
from .base import Objective, Tunable, common_tunables, kd_loss, register_objective, with_own_terms


def mixup(x: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """x̃ = λx + (1−λ)x[perm], one λ ~ Beta(α, α) per batch. α = 0 turns mixup off (λ = 1),
    the limit in which Beta(α, α) puts all its mass on the two ends."""
    perm = torch.randperm(x.shape[0], device=x.device)
    if alpha <= 0:
        return x, perm, 1.0
    # Drawn on the CPU generator: one scalar, and no device sync to read it.
    lam = float(torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample())
    return lam * x + (1 - lam) * x[perm], perm, lam


def similarity_transfer(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, sigma: float
) -> Tensor:
    """Row-wise KL(softmax(S_t/σ) ‖ softmax(S_s/σ)) over the off-diagonal entries, mean over
    rows, with S = ‖P‖‖P‖ᵀ and P = softmax(z/T).

    The diagonal (a sample's similarity to itself, always 1) is dropped rather than masked,
    so each row is a distribution over the other B−1 samples.
    """
    b = student_logits.shape[0]
    if b < 2:
        return student_logits.new_zeros((), dtype=torch.float32)

    def off_diagonal_log_probs(z: Tensor) -> Tensor:
        p = F.normalize(F.softmax(z.float() / temperature, dim=1), dim=1)
        sim = p @ p.t() / sigma
        off = ~torch.eye(b, dtype=torch.bool, device=z.device)
        return F.log_softmax(sim[off].view(b, b - 1), dim=1)

    log_q_s = off_diagonal_log_probs(student_logits)
    log_q_t = off_diagonal_log_probs(teacher_logits)
    return F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)


@register_objective
class STKD(Objective):
    name = "stkd"
    tunables = {
        **common_tunables(ce_weight=1.0, kd_weight=1.0, kd_temperature=4.0, weight=1.0),
        "mix_alpha": Tunable(
            "float",
            0.4,
            "mixup Beta(α, α) concentration; 0 turns mixup off",
            {"float": [0.1, 2.0], "log": True},
            low=0.0,
        ),
        "sim_softmax_temperature": Tunable(
            "float",
            4.0,
            "T of the softmax P = softmax(z/T) the similarities are computed on",
            {"float": [1.0, 8.0]},
            low=1e-3,
        ),
        "sim_temperature": Tunable(
            "float",
            0.1,
            "σ of the row softmax over similarities",
            {"float": [0.02, 1.0], "log": True},
            low=1e-4,
        ),
    }

    def forward(
        self, student: TappedModel, teacher: TappedModel, x: Tensor, y: Tensor, index: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x_mix, perm, lam = mixup(x, self.hp["mix_alpha"])
        t = self.teacher_features(teacher, x_mix)
        s = student.forward_features(x_mix)
        terms: dict[str, Tensor] = {}
        if self.hp["ce_weight"] > 0:
            z = s.logits.float()
            ce = lam * F.cross_entropy(z, y)
            if lam < 1:
                ce = ce + (1 - lam) * F.cross_entropy(z, y[perm])
            terms["ce"] = self.hp["ce_weight"] * ce
        if self.hp["kd_weight"] > 0:
            terms["kd"] = self.hp["kd_weight"] * kd_loss(
                s.logits, t.logits, self.hp["kd_temperature"]
            )
        return s.logits, with_own_terms(terms, self.own_terms(s, t, y, index))

    def distill(self, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
        return similarity_transfer(
            s.logits, t.logits, self.hp["sim_softmax_temperature"], self.hp["sim_temperature"]
        )
