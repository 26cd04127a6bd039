"""Reusable blocks (timm's layers/ vs models/): attention, FFN, norms, gate, positions, reconstruction.

CMATH (model.py) and the baseline models assemble these; none of them knows which model it is in.
Shapes: B conversations, N utterances (queries), M utterances (keys), d hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_positions(positions: Tensor, d: int, max_period: float = 10000.0) -> Tensor:
    """p_i^{2k} = sin(i / max_period^{2k/d}), p_i^{2k+1} = cos(...)  (6-7).  (..., N) -> (..., N, d)"""
    k = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32)[..., None] * torch.exp(k * (-math.log(max_period) / d))
    pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)  # interleave sin, cos
    return pe[..., :d]


def attention_mask(key_mask: Tensor, causal: bool) -> Tensor:
    """Which keys each query may see: real keys only, and only the past when causal.  -> (B, 1, N, N)"""
    allowed = key_mask[:, None, None, :]  # (B, 1, 1, N)
    if causal:
        n = key_mask.shape[1]
        idx = torch.arange(n, device=key_mask.device)
        allowed = allowed & (idx[None, :] <= idx[:, None])  # (B, 1, N, N)
    return allowed


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with a boolean mask (SA when key_value is query, else CA).

    Masked scores are *replaced* by a finite constant (not -inf, not added), so a fully padded query row gets a
    uniform, finite distribution in fp32 and fp16 alike, and masked keys get exactly zero weight.
    """

    def __init__(self, d: int, heads: int, dropout: float, mask_value: float) -> None:
        super().__init__()
        self.heads, self.mask_value = heads, mask_value
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:  # (B, N, d) -> (B, h, N, d/h)
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, key_value: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k(key_value)), self.split_heads(self.v(key_value))

    def attend(self, query: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        q = self.split_heads(self.q(query))  # (B, h, N, dh)
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)  # (B, h, N, M)
        scores = scores.masked_fill(~allowed, self.mask_value)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2)  # (B, N, h, dh)
        return self.o(out.reshape(out.shape[0], out.shape[1], -1))  # (B, N, d)

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor) -> Tensor:
        k, v = self.keys_values(key_value)
        return self.attend(query, k, v, allowed)


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AddNormFFN(nn.Module):
    """Hbar = Norm(H~ + H); out = Norm(FFN(Hbar) + Hbar)  — the tail of every branch in (9-11)."""

    def __init__(self, d: int, ffn_mult: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(d, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, attended: Tensor, residual: Tensor) -> Tensor:
        h_bar = self.norm1(self.dropout(attended) + residual)
        return self.norm2(self.dropout(self.ffn(h_bar)) + h_bar)


class GatedFusion(nn.Module):
    """Gate (12): per-branch scores w_b = Linear_b(H_b), softmax over branches, sum_b w_b * H_b (SDT's gate)."""

    def __init__(self, d: int, branches: int) -> None:
        super().__init__()
        self.scores = nn.ModuleList(nn.Linear(d, d) for _ in range(branches))

    def forward(self, branches: list[Tensor]) -> Tensor:
        stacked = torch.stack(branches, dim=-2)  # (B, N, K, d)
        scores = torch.stack([lin(h) for lin, h in zip(self.scores, branches)], dim=-2)  # (B, N, K, d)
        return (torch.softmax(scores, dim=-2) * stacked).sum(dim=-2)  # (B, N, d)


class UtteranceConv(nn.Module):
    """Conv1D along the utterance axis: 'same' padding, or left-only padding when causal.  (B, N, c) -> (B, N, c')"""

    def __init__(self, c_in: int, c_out: int, kernel: int, causal: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel)
        self.pad = (kernel - 1, 0) if causal else ((kernel - 1) // 2, kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x.transpose(1, 2), self.pad)).transpose(1, 2)


class ModalityReconstruction(nn.Module):
    """(1-2): U'_m = Conv1D'(U_m) (d_m -> d), U''_m = Conv1D''(U'_m) (d -> d_m). Padded rows are zeroed first,
    so they look exactly like the conv's own zero padding and never change a real row."""

    def __init__(self, d_in: int, d: int, kernel: int, causal: bool) -> None:
        super().__init__()
        self.encode = UtteranceConv(d_in, d, kernel, causal)
        self.decode = UtteranceConv(d, d_in, kernel, causal)

    def forward(self, u: Tensor, row_mask: Tensor, reconstruct: bool) -> tuple[Tensor, Tensor | None]:
        u_prime = self.encode(u * row_mask) * row_mask  # (B, N, d)
        return u_prime, (self.decode(u_prime) if reconstruct else None)  # U''_m: (B, N, d_m)


class LinearProjection(nn.Module):
    """The "w/o MR" ablation: a fully-connected layer d_m -> d instead of the reconstruction convolutions."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)

    def forward(self, u: Tensor, row_mask: Tensor, reconstruct: bool) -> tuple[Tensor, Tensor | None]:
        return self.proj(u) * row_mask, None


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
