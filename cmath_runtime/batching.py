"""Padding conversations into one rectangular batch (numpy only; training reuses it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def pad_conversations(
    features: Sequence[Mapping[str, np.ndarray]],
    speakers: Sequence[np.ndarray],
    modalities: Sequence[str],
    length: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Right-pad conversations to `length` (default: the longest).

    Returns ({m: (B, N, d_m) float32}, speaker (B, N) int64, mask (B, N) bool); padded rows are zero.
    """
    lengths = [len(s) for s in speakers]
    n = max(lengths) if length is None else length
    b = len(speakers)
    out = {m: np.zeros((b, n, features[0][m].shape[-1]), np.float32) for m in modalities}
    speaker = np.zeros((b, n), np.int64)
    mask = np.zeros((b, n), bool)
    for i, (feats, spk, k) in enumerate(zip(features, speakers, lengths)):
        for m in modalities:
            out[m][i, :k] = feats[m]
        speaker[i, :k] = spk
        mask[i, :k] = True
    return out, speaker, mask
