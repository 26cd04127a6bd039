"""CMATH's training objective (3-4, 18, 20-24), over real (unpadded, labelled) rows only.

L_all = L_ce + L_re + g1 * L_mse + g2 * L_kl   (24)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig
from .model import CMATHOutput


def masked_mean(x: Tensor, rows: Tensor) -> Tensor:
    """Mean of x (B, N, ...) over the rows where `rows` (B, N) is True and over any trailing axes."""
    x = x[rows]
    return x.mean() if x.numel() else x.sum()


def cross_entropy(logits: Tensor, labels: Tensor, rows: Tensor, weight: Tensor | None) -> Tensor:
    """(20-21): -1/n sum_i sum_j y_ij log y^_ij over real rows."""
    return F.cross_entropy(logits[rows], labels[rows], weight=weight) if rows.any() else logits.sum() * 0


def reconstruction_loss(out: CMATHOutput, rows: Tensor) -> Tensor:
    """(3-4) L_re = sum_m ||U_m - U''_m||^2; ours: mean over real rows and features, summed over modalities."""
    return sum((masked_mean((out.inputs[m] - rec) ** 2, rows) for m, rec in out.reconstructions.items()), torch.zeros(()))


def low_level_distillation(out: CMATHOutput, rows: Tensor) -> Tensor:
    """(18) L_mse = sum_m ||H'_x - H'_m||^2, teacher H'_x; ours: mean squared error over real rows and features."""
    return sum(masked_mean((out.embedding - h_m) ** 2, rows) for h_m in out.modality_embeddings.values())


def high_level_distillation(out: CMATHOutput, rows: Tensor, detach_teacher: bool) -> Tensor:
    """(23) L_kl = sum_m 1/n sum_i sum_j y^x_ij log(y^x_ij / y^m_ij): the fused prediction teaches each modality."""
    teacher = out.logits.detach() if detach_teacher else out.logits
    log_p_x = F.log_softmax(teacher, dim=-1)
    terms = []
    for logits_m in out.modality_logits.values():
        kl = (log_p_x.exp() * (log_p_x - F.log_softmax(logits_m, dim=-1))).sum(-1)  # (B, N)
        terms.append(masked_mean(kl, rows))
    return sum(terms)


def cmath_loss(
    out: CMATHOutput, labels: Tensor, mask: Tensor, cfg: LossConfig, class_weight: Tensor | None = None
) -> dict[str, Tensor]:
    """All loss terms and their weighted total (24). Rows with label < 0 (padding) are ignored."""
    rows = mask & (labels >= 0)
    ce_x = cross_entropy(out.logits, labels, rows, class_weight)  # (21)
    ce_m = sum(cross_entropy(lg, labels, rows, class_weight) for lg in out.modality_logits.values())  # (20)
    ce = ce_x + ce_m  # (22)
    re = reconstruction_loss(out, mask) if cfg.use_reconstruction else torch.zeros(())
    mse = low_level_distillation(out, rows)
    kl = high_level_distillation(out, rows, cfg.detach_teacher)
    total = ce + re + cfg.gamma_mse * mse + cfg.gamma_kl * kl  # (24)
    return {"total": total, "ce_x": ce_x, "ce_m": ce_m, "re": re, "mse": mse, "kl": kl}
