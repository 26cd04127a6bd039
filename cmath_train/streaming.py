"""Streaming CMATH: the exact incremental step of a causal model, as the model's own forward with a cache.

A causal CMATH has exactly one attention layer per branch, so the only operations across utterances are the
Conv1D' (row i reads the standardised rows i-k+1..i) and the attentions (row i attends to keys/values of rows
0..i); everything else is per row. `CMATH.forward(..., cache=StepCache)` (models/cmath.py) computes the new
utterance from what it keeps per conversation:

* `tails[m]`: the last k-1 standardised input rows of modality m (zeros before the start = the conv's padding),
* K and V (P, d) of the past rows for every attention module "{centre}{source}" (`"tt"` is the SA of centre t,
  `"ta"` the CA a->t), see `CMATH.attention_names`,
* `position`: the index of the next utterance.

A step costs O(P d + d^2) instead of the full forward's O(P^2 d + P d^2) and gives row P of the full forward
(eval mode, mean path). `StepModule` is the flat-tensor wrapper cmath_export/step_graph.py exports to ONNX; it
takes a *batch* of conversations at different positions (past K/V padded to the longest history).
`StreamState` + `step()` are the eager helpers that append the new rows to one conversation's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cmath_runtime.errors import InputError

from .cdat import CDaT
from .layers import KVCache
from .models.cmath import CMATH, StepCache


def streamable(model: nn.Module) -> bool:
    """Whether StepModule can step this model: a causal CMATH, bare or wrapped by the CDaT add-on."""
    inner = model.model if isinstance(model, CDaT) else model
    return isinstance(inner, CMATH) and bool(inner.cfg.causal)


def check_streamable(model: nn.Module) -> CMATH:
    if not isinstance(model, CMATH):
        raise InputError(
            "model", "a CMATH model (the step is written for CMATH's cache)", type(model).__name__
        )
    if not model.cfg.causal:
        raise InputError(
            "model.cfg.causal",
            "True (train with `cmath-train --causal`): in a bidirectional model "
            "future utterances change past outputs, so there is no exact step",
            False,
        )
    return model


class StepModule(nn.Module):
    """B conversations, one new utterance each, through a causal CMATH in eval mode: a pure function of flat tensors.

    forward(*features (B, d_m), speaker (B,) int64, position (B,) int64, *tails (B, k-1, d_m) [when k-1 > 0],
            *past keys/values (B, P, d) in `names` order, k before v)
      -> probs (B, C), embedding (B, d), *new tails (B, k-1, d_m), *new key/value rows (B, d)
    Past key j of row b is real iff j < position[b]; rows past it are padding (any value). Positions are read
    from the model's position table (cmath-export sizes it to max_len); position >= max_len fails.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        super().__init__()
        # a CDaT-wrapped CMATH: its per-utterance transfer encoders G_m run first (cdat.py)
        self.inputs = model.inputs.eval() if isinstance(model, CDaT) else None
        self.model = check_streamable(model.model if isinstance(model, CDaT) else model).eval()
        self.modalities: tuple[str, ...] = tuple(self.model.cfg.modalities)
        self.names: list[str] = self.model.attention_names()
        self.tail = self.model.tail_length()
        self.max_len = max_len

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        n_m = len(self.modalities)
        features, (speaker, position) = inputs[:n_m], inputs[n_m : n_m + 2]
        rest = inputs[n_m + 2 :]
        tails, past = (rest[:n_m], rest[n_m:]) if self.tail else ((), rest)
        cache = StepCache(
            position,
            dict(zip(self.modalities, tails)),
            {name: KVCache(past[2 * j], past[2 * j + 1]) for j, name in enumerate(self.names)},
        )
        feats = {m: x[:, None] for m, x in zip(self.modalities, features)}
        mask = torch.ones_like(speaker, dtype=torch.bool)[:, None]
        if self.inputs is not None:
            feats = self.inputs(feats, mask)
        out = self.model(feats, speaker[:, None], mask, reconstruct=False, cache=cache)
        new_tails = [cache.new_tails[m] for m in self.modalities] if self.tail else []
        new_kv = [t[:, 0] for name in self.names for t in cache.attention[name].new_rows()]
        return (torch.softmax(out.logits[:, 0], dim=-1), out.embedding[:, 0], *new_tails, *new_kv)


@dataclass
class StreamState:
    """The cache of one conversation (eager helper): tails per modality, K/V per attention module, position."""

    tails: dict[str, Tensor]  # m -> (k-1, d_m)
    keys: dict[str, Tensor]  # name -> (P, d)
    values: dict[str, Tensor]
    position: int = 0
    names: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, step: StepModule) -> StreamState:
        cfg = step.model.cfg
        tails = {m: torch.zeros(step.tail, cfg.feature_dims[m]) for m in step.modalities}
        keys = {name: torch.zeros(0, cfg.d) for name in step.names}
        return cls(tails, keys, {k: v.clone() for k, v in keys.items()}, 0, list(step.names))

    def inputs(self) -> list[Tensor]:
        """The state as StepModule's batch-1 inputs (tails, then K/V in `names` order)."""
        kv = [t[None] for name in self.names for t in (self.keys[name], self.values[name])]
        return [*(t[None] for t in self.tails.values() if t.shape[0]), *kv]

    def advanced(self, outputs: tuple[Tensor, ...], tail: bool) -> StreamState:
        """The state after one step: new tails replace the old, new K/V rows are appended (batch row 0)."""
        n_t = len(self.tails) if tail else 0
        tails = dict(zip(self.tails, (t[0] for t in outputs[2 : 2 + n_t]))) if n_t else self.tails
        rows = outputs[2 + n_t :]
        keys = {name: torch.cat([self.keys[name], rows[2 * j]]) for j, name in enumerate(self.names)}
        values = {name: torch.cat([self.values[name], rows[2 * j + 1]]) for j, name in enumerate(self.names)}
        return StreamState(tails, keys, values, self.position + 1, self.names)


@torch.no_grad()
def step(
    module: StepModule, state: StreamState, features: dict[str, Tensor], speaker: int
) -> tuple[Tensor, Tensor, StreamState]:
    """probs (C,), embedding (d,) of the new utterance and the state after it. features[m]: (d_m,) raw."""
    if state.position >= module.max_len:
        raise InputError(
            "position", f"< {module.max_len} (the step's cache capacity, max_len)", state.position
        )
    mods = module.modalities
    if set(features) != set(mods):
        raise InputError("features", f"modalities {list(mods)}", sorted(features))
    feats = [features[m].reshape(1, -1).float() for m in mods]
    out = module(*feats, torch.tensor([speaker]), torch.tensor([state.position]), *state.inputs())
    return out[0][0], out[1][0], state.advanced(out, bool(module.tail))
