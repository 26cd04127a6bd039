"""Pieces the baseline models share: standardised masked inputs, conversation context, one transformer layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cmath_runtime.errors import InputError

from ..config import LossConfig, ModelConfig
from ..layers import MLP, AddNormFFN, Attention, SinusoidalPositions


class ConversationModel(nn.Module):
    """What training reads of every registered model (and of the CDaT add-on that wraps one): its config, its
    loss terms and where the train split's input statistics go. `forward(features, speaker, mask, ...)` returns an
    output with at least `logits`, `embedding` and `modality_logits`."""

    cfg: ModelConfig

    def loss(
        self, out: Any, labels: Tensor, mask: Tensor, cfg: LossConfig, class_weight: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The loss terms and their weighted "total"."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by cmath-train")

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        """Store the train split's per-feature mean/std of each modality."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by cmath-train")


class Standardize(nn.Module):
    """Input normalisation (ours): (x - train mean) / train std, folded into the graph as buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


STD_FLOOR = 0.1  # no feature's std below this share of its modality's median std (safe_std)


def safe_std(mean: Tensor, std: Tensor) -> Tensor:
    """The train std, made safe to divide by. A feature whose std is within float32 rounding of its mean (std < 10
    * eps * max(1, |mean|)) carries no information in train: it gets 1, as scikit-learn's StandardScaler does. Any
    other std is at least STD_FLOOR x the median std of the modality's features: a feature that barely moves in train
    (a fine-tuned encoder leaves a few dimensions all but dead, std ~1e-5 against a median of ~0.04) would otherwise
    multiply the smallest difference at inference (fp16 or int8 rounding in the encoder) into hundreds of train
    standard deviations and flip the prediction."""
    eps = torch.finfo(torch.float32).eps
    constant = std < 10 * eps * mean.abs().clamp_min(1.0)
    if bool(constant.all()):
        return torch.ones_like(std)
    floor = STD_FLOOR * std[~constant].median()
    return torch.where(constant, torch.ones_like(std), std.clamp_min(floor))


@torch.no_grad()
def set_standardize_stats(
    standardize: nn.ModuleDict, cfg: ModelConfig, mean: dict[str, Tensor], std: dict[str, Tensor]
) -> None:
    """Store the train split's per-feature mean/std in each modality's Standardize (only when cfg.standardize)."""
    if not cfg.standardize:
        return
    for m in cfg.modalities:
        layer = standardize[m]
        assert isinstance(layer, Standardize), type(layer)
        layer.mean.copy_(mean[m])
        layer.std.copy_(safe_std(mean[m], std[m]))


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
        self.positions = SinusoidalPositions(cfg.d, cfg.pos_max_period)  # P (6-7)

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """-> (m -> (B, N, d_m) standardised features, 0 in padded rows; (B, N, d) context S + P)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        rows = mask[..., None]
        inputs = {m: torch.where(rows, self.standardize[m](features[m]), 0.0) for m in self.cfg.modalities}
        speaker = torch.where(
            mask, speaker, 0
        )  # padded rows may hold any id; they must not index out of range
        p = self.positions.first(mask.shape[1], mask.device)  # P (6-7): (N, d)
        context = self.speaker_embedding(speaker) + p  # S + P
        return inputs, context

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        set_standardize_stats(self.standardize, self.cfg, mean, std)
