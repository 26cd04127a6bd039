"""CMATH: Cross-Modality Augmented Transformer with Hierarchical Variational Distillation (Zhu et al., 2024).

Reads top to bottom like the paper; numbers in (parentheses) are its equations (public code:
github.com/cjw-MER/CMATH). Shapes: B conversations, N utterances, d hidden size, C classes.

    U_m --(1-2) Conv1D'--> U'_m --(5-8) + S + P--> H_m --(9-14) CMA-Transformer_m--> H'_m
    H'_m --(15) MLPs--> mu_m, sigma_m --(16) mean over m--> mu_x, sigma_x --(17)--> H'_x
    H'_m, H'_x --(19)--> Y^_m, Y^_x            losses (3-4, 18, 20-24): losses.py

Eval mode is the deterministic mean path: H'_x = mu_x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig, ModelConfig, coerce
from ..layers import (
    MLP,
    AddNormFFN,
    Attention,
    GatedFusion,
    KVCache,
    LinearProjection,
    ModalityReconstruction,
    SinusoidalPositions,
    attention_mask,
)
from ..losses import cmath_loss
from .common import ConversationModel, Standardize, check_inputs, set_standardize_stats


@dataclass
class CMATHConfig(ModelConfig):
    """CMATH's own fields (the shared ones are in config.ModelConfig)."""

    conv_kernel: int = (
        3  # k_m of Conv1D' / Conv1D'' (1-2), 'same' padding (left-only when causal) over utterances
    )
    vf_hidden_mult: int = 1  # hidden width of MLP_mu / MLP_sigma (15) = vf_hidden_mult * d
    sigma_eps: float = 1e-4  # sigma_m = softplus(.) + eps keeps the variance positive (15)
    # Ablations of the paper's table 4.
    modality_reconstruction: bool = True  # False = "w/o MR": a linear layer d_m -> d instead of Conv1D'/''
    cross_modal: bool = True  # False = "w/o CMA-T": each modality only attends to itself, no gate

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_kernel < 1:
            raise ValueError(f"conv_kernel: expected >= 1, got {self.conv_kernel}")


@dataclass
class CMATHLossConfig(LossConfig):
    """L_all = L_ce + L_re + g1 * L_mse + g2 * L_kl (24); the shared fields are in config.LossConfig."""

    gamma_mse: float = 1.0  # g1, low-level distillation L_mse (18)
    gamma_kl: float = 1.0  # g2, high-level distillation L_kl (23)
    use_reconstruction: bool = True  # L_re (3-4); only meaningful with modality_reconstruction
    detach_teacher: bool = True  # the fused prediction Y^_x teaches Y^_m without receiving gradient from L_kl
    # The fused representation H'_x "teaches" each H'_m in L_mse (18). The paper names H'_x the teacher but writes
    # L_mse as a plain term of L_all (24) and mentions no stop-gradient, so by default (False) L_mse's gradient
    # reaches both sides, as before this option existed. True stops it at H'_x (a classic teacher). Measured: with
    # True, nothing bounds H'_x (a mean of MLP outputs) while H'_m are LayerNorm-bounded, so on the tiny overfit
    # batch (tests/test_losses.py) L_mse grows (total loss 57 -> 238 over steps 150 -> 300) instead of vanishing.
    detach_mse_teacher: bool = False


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


@dataclass
class StepCache:
    """What a causal CMATH needs from the past to compute new utterances (nanoGPT's `past`), per conversation b:

    position (B,) int64: index of the new utterance; past keys j < position[b] are real, the rest padding.
    tails: m -> (B, k-1, d_m) the last k-1 standardised input rows (zeros before the start = the conv's padding);
           empty for the "w/o MR" linear projection (k-1 = 0 rows).
    attention: "{centre}{source}" -> KVCache (B, P, d) of every attention module (`CMATH.attention_names`).
    forward fills `new_tails` (B, k-1, d_m) and each KVCache's new rows (B, 1, d); the caller appends them.
    """

    position: Tensor
    tails: dict[str, Tensor]
    attention: dict[str, KVCache]
    new_tails: dict[str, Tensor] = field(default_factory=dict)

    def allowed(self) -> Tensor:
        """(B, 1, 1, P + 1): the real past keys of each conversation, then the new utterance's own key."""
        past = next(iter(self.attention.values())).keys.shape[1]
        real = torch.arange(past, device=self.position.device)[None, :] < self.position[:, None]  # (B, P)
        return torch.cat([real, torch.ones_like(self.position[:, None], dtype=torch.bool)], dim=1)[
            :, None, None, :
        ]


class CMATransformer(nn.Module):
    """Cross-modality augmented transformer centred on one modality m (9-13)."""

    def __init__(self, cfg: CMATHConfig, n_aux: int) -> None:
        super().__init__()
        d = cfg.d
        self.self_attn = Attention(d, cfg.heads, cfg.dropout, cfg.attn_mask_value)
        self.cross_attn = nn.ModuleList(
            Attention(d, cfg.heads, cfg.dropout, cfg.attn_mask_value) for _ in range(n_aux)
        )
        self.center_tail = AddNormFFN(d, cfg.ffn_mult, cfg.dropout, cfg.norm_eps)
        self.cross_tail = nn.ModuleList(
            AddNormFFN(d, cfg.ffn_mult, cfg.dropout, cfg.norm_eps) for _ in range(n_aux)
        )
        self.gate = GatedFusion(d, 1 + n_aux) if n_aux else None

    def forward(
        self, h_m: Tensor, h_aux: list[Tensor], allowed: Tensor, cache: list[KVCache] | None = None
    ) -> Tensor:
        """`cache`: the past of [self-attention, *cross-attentions] in that order (streaming), else None."""
        past: Sequence[KVCache | None] = cache or [None] * (1 + len(self.cross_attn))
        # (9-10) H~_{a->m} = CA(H_m, H_a, H_a) for every auxiliary modality a
        cross = [attn(h_m, h_a, allowed, kv) for attn, h_a, kv in zip(self.cross_attn, h_aux, past[1:])]
        # (11) H~_{m->m} = SA(H_m) + sum_a H~_{a->m};  H_{m->m} = Norm(FFN(Hbar) + Hbar), Hbar = Norm(H~ + H_m)
        h_mm = self.center_tail(self.self_attn(h_m, h_m, allowed, past[0]) + sum(cross), h_m)
        if self.gate is None:  # one modality, or the "w/o CMA-T" ablation: no auxiliary branch
            return h_mm
        # (9-10) H_{a->m} = Norm(FFN(Hbar) + Hbar), Hbar = Norm(H~_{a->m} + H_m)
        h_am = [tail(c, h_m) for tail, c in zip(self.cross_tail, cross)]
        return self.gate([h_mm, *h_am])  # (12) H'_m = Gate(H_{m->m}, H_{a->m}, ...)


class CMATH(ConversationModel):
    cfg: CMATHConfig

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = coerce(CMATHConfig, cfg)
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
        self.positions = SinusoidalPositions(d, cfg.pos_max_period)  # P (6-7)
        self.dropout = nn.Dropout(cfg.dropout)
        self.n_aux = n_aux  # auxiliary modalities each centre attends to
        self.cma = nn.ModuleDict({m: CMATransformer(cfg, n_aux) for m in mods})
        hidden = cfg.vf_hidden_mult * d
        self.mlp_mu = nn.ModuleDict({m: MLP(d, hidden, d) for m in mods})
        self.mlp_sigma = nn.ModuleDict({m: MLP(d, hidden, d) for m in mods})
        self.classify_m = nn.ModuleDict({m: nn.Linear(d, cfg.num_classes) for m in mods})
        self.classify_x = nn.Linear(d, cfg.num_classes)

    def attention_names(self) -> list[str]:
        """ "{centre}{source}" of every attention module, in a fixed order: per centre its SA, then its CAs."""
        return [m + a for m in self.cfg.modalities for a in self._sources(m)]

    def _sources(self, m: str) -> tuple[str, ...]:
        """The modalities centre m attends to: itself (SA), then its auxiliaries (CA) when cross-modal."""
        aux = [a for a in self.cfg.modalities if a != m]
        return (m, *aux[: self.n_aux])

    def tail_length(self) -> int:
        """How many past standardised input rows the Conv1D' reads (0 for the "w/o MR" linear projection)."""
        return self.cfg.conv_kernel - 1 if self.cfg.modality_reconstruction else 0

    def forward(
        self,
        features: dict[str, Tensor],
        speaker: Tensor,
        mask: Tensor,
        reconstruct: bool | None = None,
        cache: StepCache | None = None,
    ) -> CMATHOutput:
        """features m -> (B, N, d_m), speaker (B, N) int, mask (B, N) bool (True = real utterance).

        With `cache` (causal models, eval mode; streaming.py): the N = 1 new utterance of each conversation at
        cache.position, attending to the cached past; the new cache rows are written into `cache`.
        """
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        cfg, mods = self.cfg, self.cfg.modalities
        reconstruct = self.training if reconstruct is None else reconstruct
        rows = mask[..., None]  # (B, N, 1)
        row_weight = rows.to(self.classify_x.weight.dtype)
        if cache is None:
            allowed = attention_mask(mask, cfg.causal)  # (B, 1, N, N)
            p = self.positions.first(mask.shape[1], mask.device)  # P (6-7): (N, d)
        else:
            allowed = cache.allowed()  # (B, 1, 1, P + 1)
            p = self.positions(cache.position)[:, None]  # (B, 1, d)

        speaker = torch.where(
            mask, speaker, 0
        )  # padded rows may hold any id; they must not index out of range
        s = self.speaker_embedding(speaker)  # S (5): (B, N, d)

        inputs, recons, h = {}, {}, {}
        for m in mods:
            inputs[m] = torch.where(rows, self.standardize[m](features[m]), 0.0)  # (B, N, d_m)
            past = None
            if cache is not None and self.tail_length():
                window = torch.cat([cache.tails[m], inputs[m]], dim=1)  # rows i-k+1..i
                past, cache.new_tails[m] = cache.tails[m], window[:, window.shape[1] - self.tail_length() :]
            u_prime, u_rec = self.reconstruction[m](
                inputs[m], row_weight, reconstruct, past
            )  # U'_m, U''_m (1-2)
            if u_rec is not None:
                recons[m] = u_rec
            h[m] = self.dropout(u_prime + s + p)  # H_m = U'_m + S + P (8)

        # (13-14) H'_m = CMA-Transformer_m(H_m, H_a, H_v), each modality in turn the centre
        h_prime = {}
        for m in mods:
            kv = None if cache is None else [cache.attention[m + a] for a in self._sources(m)]
            h_prime[m] = self.cma[m](h[m], [h[a] for a in mods if a != m], allowed, kv)

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

    def loss(
        self,
        out: CMATHOutput,
        labels: Tensor,
        mask: Tensor,
        cfg: LossConfig,
        class_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """L_all (24) and its terms; every registered model offers `loss` so training stays model-agnostic."""
        return cmath_loss(out, labels, mask, coerce(CMATHLossConfig, cfg), class_weight)

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        set_standardize_stats(self.standardize, self.cfg, mean, std)
