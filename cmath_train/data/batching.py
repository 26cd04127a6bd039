"""Dialogues -> padded torch batches, plus the train split's feature statistics."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cmath_runtime.batching import pad_conversations
from cmath_runtime.errors import InputError

from .types import Dialogue


@dataclass
class Batch:
    features: dict[str, Tensor]  # m -> (B, N, d_m)
    speaker: Tensor  # (B, N) int64
    mask: Tensor  # (B, N) bool
    labels: Tensor  # (B, N) int64, -1 on padding
    soft: Tensor | None = None  # (B, N, C) float32 soft targets (ensemble distillation), zeros on padding

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            {m: x.to(device) for m, x in self.features.items()},
            self.speaker.to(device),
            self.mask.to(device),
            self.labels.to(device),
            None if self.soft is None else self.soft.to(device),
        )


def collate(
    dialogues: Sequence[Dialogue], modalities: Sequence[str], soft: Sequence[np.ndarray] | None = None
) -> Batch:
    for d in dialogues:
        if len(d) == 0:
            raise InputError(f"conversation {d.id!r}", "at least one utterance", "an empty conversation")
    feats, speaker, mask = pad_conversations(
        [d.features for d in dialogues], [d.speakers for d in dialogues], modalities
    )
    labels = np.full(mask.shape, -1, np.int64)
    for i, d in enumerate(dialogues):
        labels[i, : len(d)] = d.labels
    targets = None
    if soft is not None:  # one (n, C) array per dialogue
        targets = torch.zeros(*mask.shape, soft[0].shape[-1])
        for i, s in enumerate(soft):
            targets[i, : len(s)] = torch.from_numpy(np.asarray(s, np.float32))
    return Batch(
        {m: torch.from_numpy(x) for m, x in feats.items()},
        torch.from_numpy(speaker),
        torch.from_numpy(mask),
        torch.from_numpy(labels),
        targets,
    )


def batches(
    dialogues: Sequence[Dialogue],
    modalities: Sequence[str],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    soft: Sequence[np.ndarray] | None = None,
) -> Iterator[Batch]:
    """Padded batches; `soft`: per-dialogue soft targets aligned with `dialogues` (they travel with their dialogue)."""
    order = np.random.default_rng(seed).permutation(len(dialogues)) if shuffle else np.arange(len(dialogues))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield collate(
            [dialogues[i] for i in chunk], modalities, None if soft is None else [soft[i] for i in chunk]
        )


def feature_stats(
    dialogues: Sequence[Dialogue], modalities: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-feature mean and std over every utterance of (the train split's) dialogues."""
    mean, std = {}, {}
    for m in modalities:
        x = np.concatenate([d.features[m] for d in dialogues]).astype(np.float64)
        mean[m], std[m] = torch.from_numpy(x.mean(0)).float(), torch.from_numpy(x.std(0)).float()
    return mean, std


def class_weights(dialogues: Sequence[Dialogue], num_classes: int) -> Tensor:
    """Inverse-frequency class weights, normalised to mean 1 over present classes."""
    counts = np.bincount(np.concatenate([d.labels for d in dialogues]), minlength=num_classes).astype(
        np.float64
    )
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)
