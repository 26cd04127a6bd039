"""Loss terms shared by every model (masked mean, cross-entropy, KL) and CMATH's training objective (3-4, 18,
20-24). Real (unpadded, labelled) rows only.

L_all = L_ce + L_re + g1 * L_mse + g2 * L_kl   (24)
CDaT (cross-modal dynamic transfer) is a separate add-on that wraps a model: cdat.py.
Imports no model: models import this module (models/cmath.py, sdt.py, dmd.py), never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class CMATHLossTerms(Protocol):
    """The fields of CMATH's loss config (models/cmath.py `CMATHLossConfig`) that `cmath_loss` reads."""

    gamma_mse: float
    gamma_kl: float
    use_reconstruction: bool
    detach_teacher: bool
    detach_mse_teacher: bool


def tensor_sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of loss terms, a 0-d zero when there are none."""
    return sum(terms, torch.zeros(()))


def masked_mean(x: Tensor, rows: Tensor) -> Tensor:
    """Mean of x (B, N, ...) over the rows where `rows` (B, N) is True and over any trailing axes."""
    x = x[rows]
    return x.mean() if x.numel() else x.sum()


def cross_entropy(logits: Tensor, labels: Tensor, rows: Tensor, weight: Tensor | None) -> Tensor:
    """(20-21): -1/n sum_i sum_j y_ij log y^_ij over real rows."""
    return F.cross_entropy(logits[rows], labels[rows], weight=weight) if rows.any() else logits.sum() * 0


def kl_divergence(teacher: Tensor, student: Tensor, rows: Tensor, temperature: float = 1.0) -> Tensor:
    """1/n sum_i KL(softmax(teacher_i / T) || softmax(student_i / T)) over the real rows (B, N) of logits
    (B, N, C). The teacher receives gradient unless the caller detaches it."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, N)
    return masked_mean(kl, rows)


def reconstruction_loss(out: Any, rows: Tensor) -> Tensor:
    """(3-4) L_re = sum_m ||U_m - U''_m||^2; ours: mean over real rows and features, summed over modalities."""
    return tensor_sum(masked_mean((out.inputs[m] - rec) ** 2, rows) for m, rec in out.reconstructions.items())


def low_level_distillation(out: Any, rows: Tensor, detach_teacher: bool = False) -> Tensor:
    """(18) L_mse = sum_m ||H'_x - H'_m||^2, teacher H'_x (no gradient when detach_teacher); ours: mean squared
    error over real rows and features."""
    teacher = out.embedding.detach() if detach_teacher else out.embedding
    return tensor_sum(masked_mean((teacher - h_m) ** 2, rows) for h_m in out.modality_embeddings.values())


def high_level_distillation(out: Any, rows: Tensor, detach_teacher: bool, temperature: float = 1.0) -> Tensor:
    """(23) L_kl = sum_m 1/n sum_i sum_j y^x_ij log(y^x_ij / y^m_ij): the fused prediction teaches each modality
    (SDT's soft labels are the same term at temperature T)."""
    teacher = out.logits.detach() if detach_teacher else out.logits
    return tensor_sum(
        kl_divergence(teacher, logits_m, rows, temperature) for logits_m in out.modality_logits.values()
    )


def ensemble_distillation(logits: Tensor, soft: Tensor, rows: Tensor) -> Tensor:
    """1/n sum_i KL(t_i || softmax(logits_i)) over real rows: t (B, N, C) the averaged class probabilities of an
    ensemble of trained seeds (fixed targets, seeds.py), logits the model's fused prediction (B, N, C)."""
    log_q = F.log_softmax(logits, dim=-1)
    kl = (soft * (torch.log(soft.clamp_min(1e-12)) - log_q)).sum(-1)  # (B, N); 0 * log 0 = 0
    return masked_mean(kl, rows)


def cmath_loss(
    out: Any, labels: Tensor, mask: Tensor, cfg: CMATHLossTerms, class_weight: Tensor | None = None
) -> dict[str, Tensor]:
    """All loss terms and their weighted total (24). Rows with label < 0 (padding) are ignored."""
    rows = mask & (labels >= 0)
    ce_x = cross_entropy(out.logits, labels, rows, class_weight)  # (21)
    ce_m = tensor_sum(
        cross_entropy(lg, labels, rows, class_weight) for lg in out.modality_logits.values()
    )  # (20)
    ce = ce_x + ce_m  # (22)
    re = reconstruction_loss(out, mask) if cfg.use_reconstruction else torch.zeros(())
    mse = low_level_distillation(out, rows, cfg.detach_mse_teacher)
    kl = high_level_distillation(out, rows, cfg.detach_teacher)
    total = ce + re + cfg.gamma_mse * mse + cfg.gamma_kl * kl  # (24)
    return {"total": total, "ce_x": ce_x, "ce_m": ce_m, "re": re, "mse": mse, "kl": kl}
