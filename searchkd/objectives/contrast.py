"""Contrastive building blocks shared by the objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(q: Tensor, k: Tensor, tau: float, positives: Tensor | None = None) -> Tensor:
    """InfoNCE(q, k; τ) over the last-but-one axis, batched over any leading axes.

    q, k: (..., N, D), already L2-normalised; row i of q is matched with row i of k and
    contrasted with every other row of k. With `positives` (N×N bool, diagonal true) every
    marked key counts as a positive (supervised-contrastive form) and the loss is the mean
    negative log-probability over them.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / tau
    log_prob = F.log_softmax(logits, dim=-1)
    if positives is None:
        return -torch.diagonal(log_prob, dim1=-2, dim2=-1).mean()
    pos = positives.to(log_prob.dtype)
    per_row = (log_prob * pos).sum(-1) / pos.sum(-1)
    return -per_row.mean()


def symmetric_info_nce(s: Tensor, t: Tensor, tau: float, positives: Tensor | None = None) -> Tensor:
    """Mean of student→teacher and teacher→student InfoNCE."""
    return 0.5 * (info_nce(s, t, tau, positives) + info_nce(t, s, tau, positives))
