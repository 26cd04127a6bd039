"""The same seeded inputs for every backend: conversations of given lengths, numpy first (torch converts them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    modalities: tuple[str, ...]
    feature_dims: dict[str, int]
    num_speakers: int

    @classmethod
    def of(cls, model: Any) -> InputSpec:
        """The inputs of a manifest, a model config or a loaded model (each has these three fields)."""
        return cls(tuple(model.modalities), dict(model.feature_dims), int(model.num_speakers))


def conversations(spec: InputSpec, batch: int, length: int, seed: int = 0) -> list[dict]:
    """`batch` conversations of `length` utterances: standard-normal features, 2-4 speakers taking turns."""
    rng = np.random.default_rng([seed, batch, length])
    out = []
    for _ in range(batch):
        speakers_here = int(rng.integers(2, min(4, spec.num_speakers) + 1)) if spec.num_speakers > 1 else 1
        speakers = rng.integers(0, speakers_here, length).astype(np.int64)
        feats = {
            m: rng.standard_normal((length, spec.feature_dims[m])).astype(np.float32) for m in spec.modalities
        }
        out.append({"speakers": speakers, "features": feats})
    return out


def padded(spec: InputSpec, convs: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Right-padded (B, N, d_m) features, (B, N) speakers and mask, as the model's batches are."""
    from cmath_runtime.batching import pad_conversations

    return pad_conversations([c["features"] for c in convs], [c["speakers"] for c in convs], spec.modalities)
