"""CMATH: Cross-Modality Augmented Transformer with Hierarchical Variational Distillation (Zhu et al., 2024).

Reads top to bottom like the paper; numbers in (parentheses) are its equations, see
../shared/docs/cmath-model.md. Shapes: B conversations, N utterances, d hidden size, C classes.

    U_m --(1-2) Conv1D'--> U'_m --(5-8) + S + P--> H_m --(9-14) CMA-Transformer_m--> H'_m
    H'_m --(15) MLPs--> mu_m, sigma_m --(16) mean over m--> mu_x, sigma_x --(17)--> H'_x
    H'_m, H'_x --(19)--> Y^_m, Y^_x            losses (3-4, 18, 20-24): losses.py

Eval mode is the deterministic mean path: H'_x = mu_x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmath_runtime.errors import InputError

from .config import LossConfig, ModelConfig
from .layers import (
    MLP,
    AddNormFFN,
    Attention,
    GatedFusion,
    LinearProjection,
    ModalityReconstruction,
    attention_mask,
    sinusoidal_positions,
)
from .registry import register


@dataclass
class CMATHOutput:
    logits: Tensor  # (B, N, C) fused prediction Y^_x before softmax
    embedding: Tensor  # (B, N, d) H'_x (= mu_x in eval mode)
    modality_logits: dict[str, Tensor]  # m -> (B, N, C) Y^_m before softmax
    modality_embeddings: dict[str, Tensor]  # m -> (B, N, d) H'_m
    mu: Tensor  # (B, N, d) mu_x
    sigma: Tensor  # (B, N, d) sigma_x
    inputs: dict[str, Tensor]  # m -> (B, N, d_m) standardised U_m, the target of the reconstruction
    reconstructions: dict[str, Tensor]  # m -> (B, N, d_m) U''_m (empty without reconstruction)


class Standardize(nn.Module):
    """Input normalisation (ours): (x - train mean) / train std, folded into the graph as buffers."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class CMATransformer(nn.Module):
    """Cross-modality augmented transformer centred on one modality m (9-13)."""

    def __init__(self, cfg: ModelConfig, n_aux: int) -> None:
        super().__init__()
        d = cfg.d
        self.self_attn = Attention(d, cfg.heads, cfg.dropout, cfg.attn_mask_value)
        self.cross_attn = nn.ModuleList(Attention(d, cfg.heads, cfg.dropout, cfg.attn_mask_value) for _ in range(n_aux))
        self.center_tail = AddNormFFN(d, cfg.ffn_mult, cfg.dropout, cfg.norm_eps)
        self.cross_tail = nn.ModuleList(AddNormFFN(d, cfg.ffn_mult, cfg.dropout, cfg.norm_eps) for _ in range(n_aux))
        self.gate = GatedFusion(d, 1 + n_aux) if n_aux else None

    def forward(self, h_m: Tensor, h_aux: list[Tensor], allowed: Tensor) -> Tensor:
        # (9-10) H~_{a->m} = CA(H_m, H_a, H_a) for every auxiliary modality a
        cross = [attn(h_m, h_a, allowed) for attn, h_a in zip(self.cross_attn, h_aux)]
        # (11) H~_{m->m} = SA(H_m) + sum_a H~_{a->m};  H_{m->m} = Norm(FFN(Hbar) + Hbar), Hbar = Norm(H~ + H_m)
        h_mm = self.center_tail(self.self_attn(h_m, h_m, allowed) + sum(cross), h_m)
        if self.gate is None:  # one modality, or the "w/o CMA-T" ablation: no auxiliary branch
            return h_mm
        # (9-10) H_{a->m} = Norm(FFN(Hbar) + Hbar), Hbar = Norm(H~_{a->m} + H_m)
        h_am = [tail(c, h_m) for tail, c in zip(self.cross_tail, cross)]
        return self.gate([h_mm, *h_am])  # (12) H'_m = Gate(H_{m->m}, H_{a->m}, ...)


class CMATH(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mods, d = cfg.modalities, cfg.d
        n_aux = len(mods) - 1 if cfg.cross_modal else 0
        self.standardize = nn.ModuleDict({m: Standardize(cfg.feature_dims[m]) for m in mods})
        self.reconstruction = nn.ModuleDict(
            {
                m: ModalityReconstruction(cfg.feature_dims[m], d, cfg.conv_kernel, cfg.causal)
                if cfg.modality_reconstruction
                else LinearProjection(cfg.feature_dims[m], d)
                for m in mods
            }
        )
        self.speaker_embedding = nn.Embedding(cfg.num_speakers, d)  # V_s . o(s_j)  (5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.cma = nn.ModuleDict({m: CMATransformer(cfg, n_aux) for m in mods})
        hidden = cfg.vf_hidden_mult * d
        self.mlp_mu = nn.ModuleDict({m: MLP(d, hidden, d) for m in mods})
        self.mlp_sigma = nn.ModuleDict({m: MLP(d, hidden, d) for m in mods})
        self.classify_m = nn.ModuleDict({m: nn.Linear(d, cfg.num_classes) for m in mods})
        self.classify_x = nn.Linear(d, cfg.num_classes)

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor, reconstruct: bool | None = None
    ) -> CMATHOutput:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        cfg, mods = self.cfg, self.cfg.modalities
        reconstruct = self.training if reconstruct is None else reconstruct
        rows = mask[..., None]  # (B, N, 1)
        row_weight = rows.to(self.classify_x.weight.dtype)
        allowed = attention_mask(mask, cfg.causal)  # (B, 1, N, N)

        s = self.speaker_embedding(speaker)  # S (5): (B, N, d)
        positions = torch.arange(mask.shape[1], device=mask.device)
        p = sinusoidal_positions(positions, cfg.d, cfg.pos_max_period)  # P (6-7): (N, d)

        inputs, recons, h = {}, {}, {}
        for m in mods:
            inputs[m] = torch.where(rows, self.standardize[m](features[m]), 0.0)  # (B, N, d_m)
            u_prime, u_rec = self.reconstruction[m](inputs[m], row_weight, reconstruct)  # U'_m, U''_m (1-2)
            if u_rec is not None:
                recons[m] = u_rec
            h[m] = self.dropout(u_prime + s + p)  # H_m = U'_m + S + P (8)

        # (13-14) H'_m = CMA-Transformer_m(H_m, H_a, H_v), each modality in turn the centre
        h_prime = {m: self.cma[m](h[m], [h[a] for a in mods if a != m], allowed) for m in mods}

        mu = {m: self.mlp_mu[m](h_prime[m]) for m in mods}  # mu_m = MLP_mu_m(H'_m) (15)
        sigma = {m: F.softplus(self.mlp_sigma[m](h_prime[m])) + cfg.sigma_eps for m in mods}  # sigma_m (15)
        mu_x = torch.stack([mu[m] for m in mods]).mean(0)  # (16)
        sigma_x = torch.stack([sigma[m] for m in mods]).mean(0)  # (16)
        h_x = mu_x + torch.randn_like(sigma_x) * sigma_x if self.training else mu_x  # (17); eval: mean path

        return CMATHOutput(
            logits=self.classify_x(h_x),  # Y^_x (19)
            embedding=h_x,
            modality_logits={m: self.classify_m[m](h_prime[m]) for m in mods},  # Y^_m (19)
            modality_embeddings=h_prime,
            mu=mu_x,
            sigma=sigma_x,
            inputs=inputs,
            reconstructions=recons,
        )

    def loss(self, out: CMATHOutput, labels: Tensor, mask: Tensor, cfg: LossConfig,
             class_weight: Tensor | None = None) -> dict[str, Tensor]:
        """L_all (24) and its terms; every registered model offers `loss` so training stays model-agnostic."""
        from .losses import cmath_loss

        return cmath_loss(out, labels, mask, cfg, class_weight)

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        set_standardize_stats(self.standardize, self.cfg, mean, std)


@torch.no_grad()
def set_standardize_stats(standardize: nn.ModuleDict, cfg: ModelConfig, mean: dict[str, Tensor],
                          std: dict[str, Tensor]) -> None:
    """Store the train split's per-feature mean/std in each modality's Standardize (only when cfg.standardize)."""
    if not cfg.standardize:
        return
    for m in cfg.modalities:
        standardize[m].mean.copy_(mean[m])
        standardize[m].std.copy_(std[m].clamp_min(1e-6))


def check_inputs(cfg: ModelConfig, features: dict[str, Tensor], speaker: Tensor, mask: Tensor) -> None:
    """Clear errors for bad input before it reaches any layer: each names the field, expected and actual."""
    if set(features) != set(cfg.modalities):
        raise InputError("features", f"modalities {list(cfg.modalities)}", f"{sorted(features)}")
    if mask.dtype != torch.bool:
        raise InputError("mask", "dtype torch.bool", mask.dtype)
    if mask.ndim != 2:
        raise InputError("mask", "shape (batch, utterances)", tuple(mask.shape))
    b, n = mask.shape
    if b == 0 or n == 0:
        raise InputError("mask", "at least one conversation with at least one utterance", f"shape {(b, n)}")
    if not mask.any():
        raise InputError("mask", "at least one real utterance", "an all-padding batch")
    if speaker.shape != mask.shape:
        raise InputError("speaker", f"shape {(b, n)} like mask", tuple(speaker.shape))
    if speaker.dtype.is_floating_point or speaker.dtype == torch.bool:
        raise InputError("speaker", "an integer dtype", speaker.dtype)
    real_speakers = speaker[mask]
    low, high = int(real_speakers.min()), int(real_speakers.max())
    if low < 0 or high >= cfg.num_speakers:
        bad = low if low < 0 else high
        raise InputError("speaker", f"ids in [0, {cfg.num_speakers - 1}]", bad)
    for m in cfg.modalities:
        x = features[m]
        expected = (b, n, cfg.feature_dims[m])
        if tuple(x.shape) != expected:
            raise InputError(f"features[{m!r}]", f"shape {expected}", tuple(x.shape))
        if not x.dtype.is_floating_point:
            raise InputError(f"features[{m!r}]", "a floating-point dtype", x.dtype)
        if not torch.isfinite(x[mask]).all():
            raise InputError(f"features[{m!r}]", "finite values", "NaN or inf in a real utterance")


@register("cmath")
def build_cmath(cfg: ModelConfig) -> CMATH:
    return CMATH(cfg)
