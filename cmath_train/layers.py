"""Reusable blocks (timm's layers/ vs models/): attention, FFN, norms, gate, positions, reconstruction.

CMATH and the baseline models (models/) assemble these; none of them knows which model it is in.
Shapes: B conversations, N utterances (queries), M utterances (keys), d hidden size.

Streaming (nanoGPT's optional past): `Attention` takes an optional `KVCache` (the past keys/values of that one
module); `UtteranceConv` takes optional `past` rows in place of its causal left padding. The models' own forward
passes them through, so the incremental step is the model's forward, not a re-implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_positions(positions: Tensor, d: int, max_period: float = 10000.0) -> Tensor:
    """p_i^{2k} = sin(i / max_period^{2k/d}), p_i^{2k+1} = cos(...)  (6-7).  (..., N) -> (..., N, d)"""
    k = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32)[..., None] * torch.exp(k * (-math.log(max_period) / d))
    pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)  # interleave sin, cos
    return pe[..., :d]


DEFAULT_POSITION_ROWS = 512


class SinusoidalPositions(nn.Module):
    """P (6-7) as a (rows, d) fp32 table, a non-persistent buffer (timm's pos_embed_sincos), read with a Gather.

    In an exported graph the table is a constant looked up with a Gather instead of Range -> Mul -> Sin/Cos: in
    fp16 the angle `position * frequency` would be rounded to 0.25 rad near position 300, blurring the positions
    of long conversations; table entries in [-1, 1] lose at most 2.4e-4. A position past the table fails in the
    Gather instead of silently computing something the artifact was never checked for, so cmath-export sizes the
    table to its max_len (`set_rows`). In eager mode the table grows on demand: training never hits the limit.
    Not saved in checkpoints (it is a pure function of d and max_period).
    """

    table: Tensor

    def __init__(self, d: int, max_period: float = 10000.0, rows: int = DEFAULT_POSITION_ROWS) -> None:
        super().__init__()
        self.d, self.max_period = d, max_period
        self.register_buffer("table", self._table(rows), persistent=False)

    def _table(self, rows: int, device: torch.device | None = None) -> Tensor:
        return sinusoidal_positions(torch.arange(rows, device=device), self.d, self.max_period)

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def set_rows(self, rows: int) -> None:
        """Resize the table to exactly `rows` positions (0..rows-1)."""
        self.table = self._table(rows, self.table.device)

    def forward(self, positions: Tensor) -> Tensor:
        """(...,) int64 positions -> (..., d)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and positions.numel():
            needed = int(positions.max()) + 1
            if needed > self.rows:
                self.set_rows(max(needed, 2 * self.rows))
        flat = torch.index_select(self.table, 0, positions.reshape(-1))
        return flat.reshape(*positions.shape, self.d)

    def first(self, n: int, device: torch.device) -> Tensor:
        """Positions 0..n-1: (n, d)."""
        return self(torch.arange(n, device=device))


def attention_mask(key_mask: Tensor, causal: bool) -> Tensor:
    """Which keys each query may see: real keys only, and only the past when causal.  -> (B, 1, N, N)"""
    allowed = key_mask[:, None, None, :]  # (B, 1, 1, N)
    if causal:
        n = key_mask.shape[1]
        idx = torch.arange(n, device=key_mask.device)
        allowed = allowed & (idx[None, :] <= idx[:, None])  # (B, 1, N, N)
    return allowed


@dataclass
class KVCache:
    """The past keys/values (B, P, d) of one attention module; forward fills in the new rows (B, N_new, d)."""

    keys: Tensor
    values: Tensor
    new_keys: Tensor | None = None
    new_values: Tensor | None = None

    def new_rows(self) -> tuple[Tensor, Tensor]:
        """(new keys, new values), once forward has filled them in."""
        if self.new_keys is None or self.new_values is None:
            raise RuntimeError("KVCache.new_rows: no forward has run with this cache yet")
        return self.new_keys, self.new_values


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

    def attend(self, query: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        q = self.split_heads(self.q(query))  # (B, h, N, dh)
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)  # (B, h, N, M)
        scores = scores.masked_fill(~allowed, self.mask_value)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2)  # (B, N, h, dh)
        return self.o(out.reshape(out.shape[0], out.shape[1], -1))  # (B, N, d)

    def forward(
        self, query: Tensor, key_value: Tensor, allowed: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """With a cache, the keys are the cached past rows followed by key_value's rows, and `allowed` covers both
        (B, 1, N, P + M); the new rows are stored in the cache for the caller to append."""
        k, v = self.k(key_value), self.v(key_value)  # (B, M, d)
        if cache is not None:
            cache.new_keys, cache.new_values = k, v
            k, v = torch.cat([cache.keys, k], dim=1), torch.cat([cache.values, v], dim=1)
        return self.attend(query, self.split_heads(k), self.split_heads(v), allowed)


class AddNormFFN(nn.Module):
    """Hbar = Norm(H~ + H); out = Norm(FFN(Hbar) + Hbar)  — the tail of every branch in (9-11)."""

    def __init__(self, d: int, ffn_mult: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.ffn = MLP(d, ffn_mult * d, d, activation=nn.GELU, dropout=dropout)
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

    def forward(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        """`past` (B, k-1, c): the rows before x (streaming), read instead of the causal zero padding."""
        if past is None:
            return self.conv(F.pad(x.transpose(1, 2), self.pad)).transpose(1, 2)
        return self.conv(torch.cat([past, x], dim=1).transpose(1, 2)).transpose(1, 2)


class ModalityReconstruction(nn.Module):
    """(1-2): U'_m = Conv1D'(U_m) (d_m -> d), U''_m = Conv1D''(U'_m) (d -> d_m). Padded rows are zeroed first,
    so they look exactly like the conv's own zero padding and never change a real row."""

    def __init__(self, d_in: int, d: int, kernel: int, causal: bool) -> None:
        super().__init__()
        self.encode = UtteranceConv(d_in, d, kernel, causal)
        self.decode = UtteranceConv(d, d_in, kernel, causal)

    def forward(
        self, u: Tensor, row_mask: Tensor, reconstruct: bool, past: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        u_prime = self.encode(u * row_mask, past) * row_mask  # (B, N, d)
        return u_prime, (self.decode(u_prime) if reconstruct else None)  # U''_m: (B, N, d_m)


class LinearProjection(nn.Module):
    """The "w/o MR" ablation: a fully-connected layer d_m -> d instead of the reconstruction convolutions."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)

    def forward(
        self, u: Tensor, row_mask: Tensor, reconstruct: bool, past: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        return self.proj(u) * row_mask, None  # per row: no past needed


class MLP(nn.Module):
    """Linear -> activation [-> Dropout] -> Linear: the FFN of every transformer layer (GELU, dropout) and the
    MLP_mu / MLP_sigma of (15) (ReLU, no dropout)."""

    def __init__(
        self,
        d_in: int,
        hidden: int,
        d_out: int,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout is not None else []
        self.net = nn.Sequential(nn.Linear(d_in, hidden), activation(), *drop, nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
