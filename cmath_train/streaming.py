"""Streaming CMATH: an exact incremental step for causal models (one new utterance per call).

A causal CMATH has exactly one attention layer per branch, so the only operations across utterances are the
Conv1D' (row i reads the standardised rows i-k+1..i) and the attentions (row i attends to keys/values of rows
0..i). Everything else is per row. The step therefore keeps, per conversation:

* `tails[m]`: the last k-1 standardised input rows of modality m (zeros before the start = the conv's padding),
* `keys[name]`, `values[name]`: K and V projections (P, d) of the past rows, for every attention module
  (name `"{centre}{source}"`: `"tt"` is the SA of centre t, `"ta"` the CA a->t),
* `position`: the index of the next utterance.

A step costs O(P d + d^2) instead of the full forward's O(P^2 d + P d^2) and gives row P of the full forward
(eval mode, mean path). `StepModule` is the pure function (also exported to ONNX by cmath_export/step_graph.py);
`StreamState` + `step()` are the eager helpers that append the new rows to the caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmath_runtime.errors import InputError

from .layers import sinusoidal_positions
from .model import CMATH


def attention_names(modalities: tuple[str, ...], cross_modal: bool) -> list[tuple[str, str]]:
    """(centre, source) of every attention module, in a fixed order: SA first, then CA in modality order."""
    out = []
    for m in modalities:
        out.append((m, m))
        if cross_modal and len(modalities) > 1:
            out += [(m, a) for a in modalities if a != m]
    return out


def tail_length(model: CMATH) -> int:
    """How many past standardised input rows the Conv1D' reads (0 for the "w/o MR" linear projection)."""
    return model.cfg.conv_kernel - 1 if model.cfg.modality_reconstruction else 0


def check_streamable(model: nn.Module) -> CMATH:
    if not isinstance(model, CMATH):
        raise InputError("model", "a CMATH model (the step is written for CMATH's layers)", type(model).__name__)
    if not model.cfg.causal:
        raise InputError("model.cfg.causal", "True (train with `cmath-train --causal`): in a bidirectional model "
                                             "future utterances change past outputs, so there is no exact step",
                         False)
    return model


class StepModule(nn.Module):
    """One utterance of a causal CMATH in eval mode, as a pure function of (inputs, state) -> (outputs, new rows).

    forward(*features (1, d_m), speaker (1,) int64, position (1,) int64, *tails (k-1, d_m),
            *past keys/values (P, d) in `attention_names` order, k before v)
      -> probs (1, C), embedding (1, d), *new tails (k-1, d_m), *new key/value rows (1, d)
    Positions come from a (max_len, d) table (as in the exported full graph); position >= max_len fails.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        super().__init__()
        self.model = check_streamable(model).eval()
        cfg = self.model.cfg
        self.modalities: tuple[str, ...] = tuple(cfg.modalities)
        self.names = attention_names(self.modalities, cfg.cross_modal)
        self.tail = tail_length(self.model)
        self.max_len = max_len
        self.register_buffer("positions", sinusoidal_positions(torch.arange(max_len), cfg.d, cfg.pos_max_period),
                             persistent=False)

    def _attention(self, centre: str, source: str) -> nn.Module:
        cma = self.model.cma[centre]
        if source == centre:
            return cma.self_attn
        aux = [a for a in self.modalities if a != centre]
        return cma.cross_attn[aux.index(source)]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        mods, net, n_m = self.modalities, self.model, len(self.modalities)
        features, (speaker, position) = inputs[:n_m], inputs[n_m:n_m + 2]
        rest = inputs[n_m + 2:]
        tails = rest[:n_m] if self.tail else ()
        past = rest[n_m if self.tail else 0:]
        s = net.speaker_embedding(speaker)  # (1, d)
        p = torch.index_select(self.positions, 0, position)  # (1, d)

        h, new_tails = {}, []
        for i, m in enumerate(mods):
            u = net.standardize[m](features[i])  # (1, d_m)
            rec = net.reconstruction[m]
            if self.tail:
                window = torch.cat([tails[i], u], dim=0)  # (k, d_m): rows i-k+1..i
                u_prime = F.conv1d(window.t()[None], rec.encode.conv.weight, rec.encode.conv.bias)[0].t()  # (1, d)
                new_tails.append(window[1:])
            else:
                u_prime = rec.proj(u)
            h[m] = u_prime + s + p  # H_m (8), one row

        attended, new_kv = {}, []
        for j, (centre, source) in enumerate(self.names):
            attn = self._attention(centre, source)
            k_new, v_new = attn.k(h[source]), attn.v(h[source])  # (1, d)
            k = torch.cat([past[2 * j], k_new], dim=0)[None]  # (1, P+1, d)
            v = torch.cat([past[2 * j + 1], v_new], dim=0)[None]
            allowed = torch.ones(1, 1, 1, k.shape[1], dtype=torch.bool)
            attended[centre, source] = attn.attend(h[centre][None], attn.split_heads(k), attn.split_heads(v),
                                                   allowed)[0]  # (1, d)
            new_kv += [k_new, v_new]

        mu = []
        for m in mods:
            cma = net.cma[m]
            cross = [attended[m, a] for a in mods if a != m and (m, a) in attended]
            h_mm = cma.center_tail(attended[m, m] + sum(cross), h[m])
            h_prime = h_mm if cma.gate is None else cma.gate(
                [h_mm, *[tail(c, h[m]) for tail, c in zip(cma.cross_tail, cross)]])
            mu.append(net.mlp_mu[m](h_prime))
        h_x = torch.stack(mu).mean(0)  # mu_x (16), the eval-mode H'_x
        return (torch.softmax(net.classify_x(h_x), dim=-1), h_x, *new_tails, *new_kv)


@dataclass
class StreamState:
    """The cache of one conversation (eager helper): tails per modality, K/V per attention module, position."""

    tails: dict[str, Tensor]
    keys: dict[str, Tensor]
    values: dict[str, Tensor]
    position: int = 0
    names: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def empty(cls, step: StepModule) -> StreamState:
        cfg = step.model.cfg
        tails = {m: torch.zeros(step.tail, cfg.feature_dims[m]) for m in step.modalities}
        keys = {c + s: torch.zeros(0, cfg.d) for c, s in step.names}
        return cls(tails, keys, {k: v.clone() for k, v in keys.items()}, 0, list(step.names))

    def inputs(self) -> list[Tensor]:
        kv = [t for c, s in self.names for t in (self.keys[c + s], self.values[c + s])]
        return [*(self.tails.values() if next(iter(self.tails.values())).shape[0] else ()), *kv]


@torch.no_grad()
def step(module: StepModule, state: StreamState, features: dict[str, Tensor], speaker: int
         ) -> tuple[Tensor, Tensor, StreamState]:
    """probs (C,), embedding (d,) of the new utterance and the state after it. features[m]: (d_m,) raw."""
    if state.position >= module.max_len:
        raise InputError("position", f"< {module.max_len} (the step's cache capacity, max_len)", state.position)
    mods = module.modalities
    if set(features) != set(mods):
        raise InputError("features", f"modalities {list(mods)}", sorted(features))
    feats = [features[m].reshape(1, -1).float() for m in mods]
    out = module(*feats, torch.tensor([speaker]), torch.tensor([state.position]), *state.inputs())
    probs, emb = out[0], out[1]
    n_t = len(mods) if module.tail else 0
    tails = dict(zip(mods, out[2:2 + n_t])) if n_t else state.tails
    rows = out[2 + n_t:]
    keys, values = {}, {}
    for j, (c, s) in enumerate(module.names):
        keys[c + s] = torch.cat([state.keys[c + s], rows[2 * j]])
        values[c + s] = torch.cat([state.values[c + s], rows[2 * j + 1]])
    return probs[0], emb[0], StreamState(tails, keys, values, state.position + 1, state.names)
