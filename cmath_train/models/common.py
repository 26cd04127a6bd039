"""Pieces the baseline models share: standardised masked inputs, conversation context, one transformer layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import model as cmath_model
from ..config import ModelConfig
from ..layers import MLP, AddNormFFN, Attention
from ..model import Standardize, check_inputs, set_standardize_stats


class TransformerLayer(nn.Module):
    """A post-norm transformer layer from our blocks: out = Norm(FFN(Hbar) + Hbar), Hbar = Norm(Attn(q, kv) + q).

    Self-attention when key_value is query, cross-attention otherwise; `allowed` (B, 1, N, N) masks padded keys
    (and the future when causal) with our finite replacement mask.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d, cfg.heads, cfg.dropout, cfg.attn_mask_value)
        self.tail = AddNormFFN(cfg.d, cfg.ffn_mult, cfg.dropout, cfg.norm_eps)

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor) -> Tensor:
        return self.tail(self.attn(query, key_value, allowed), query)


class ResidualMLP(nn.Module):
    """x + MLP(x): the residual projection DMD puts before each of its classifiers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = MLP(d, d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class BaselineInputs(nn.Module):
    """Input checks, train-split standardisation, zeroed padding, speaker embeddings and positions.

    Owned by every baseline so they all read their inputs exactly as CMATH does (same buffers, same errors).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.standardize = nn.ModuleDict({m: Standardize(cfg.feature_dims[m]) for m in cfg.modalities})
        self.speaker_embedding = nn.Embedding(cfg.num_speakers, cfg.d)

    def forward(self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """-> (m -> (B, N, d_m) standardised features, 0 in padded rows; (B, N, d) context S + P)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        rows = mask[..., None]
        inputs = {m: torch.where(rows, self.standardize[m](features[m]), 0.0) for m in self.cfg.modalities}
        positions = torch.arange(mask.shape[1], device=mask.device)
        speaker = torch.where(mask, speaker, 0)  # padded rows may hold any id; they must not index out of range
        # Looked up through cmath_train.model, like CMATH does, so cmath-export's fp16-safe position table (it
        # patches cmath_train.model.sinusoidal_positions while tracing) applies to every model alike.
        p = cmath_model.sinusoidal_positions(positions, self.cfg.d, self.cfg.pos_max_period)  # P (6-7): (N, d)
        context = self.speaker_embedding(speaker) + p  # S + P
        return inputs, context

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        set_standardize_stats(self.standardize, self.cfg, mean, std)
