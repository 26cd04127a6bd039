"""What every data source produces: dialogues with per-modality features, speakers and labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmath_runtime.base import MODALITY_ORDER

SPLITS = ("train", "dev", "test")


@dataclass
class Dialogue:
    id: str
    features: dict[str, np.ndarray]  # modality -> (n, d_m) float32
    speakers: np.ndarray  # (n,) int64, 0 <= id < num_speakers
    labels: np.ndarray  # (n,) int64 class index
    texts: list[str] | None = None  # the utterances' texts, when the features were made from text

    def __len__(self) -> int:
        return len(self.speakers)


@dataclass
class FeatureSet:
    label_names: list[str]
    feature_dims: dict[str, int]  # modality -> feature size; its keys are the modalities present
    num_speakers: int
    splits: dict[str, list[Dialogue]]  # "train", optional "dev", "test"
    meta: dict[str, Any] = field(default_factory=dict)  # source, speaker mapping, text encoder, ...

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITY_ORDER if m in self.feature_dims)

    def select(self, modalities: tuple[str, ...]) -> FeatureSet:
        """The same data restricted to some of its modalities."""
        missing = [m for m in modalities if m not in self.feature_dims]
        if missing:
            raise ValueError(f"modalities: expected a subset of {self.modalities}, got {modalities}")
        keep = {m: self.feature_dims[m] for m in modalities}
        splits = {
            name: [
                Dialogue(d.id, {m: d.features[m] for m in keep}, d.speakers, d.labels, d.texts)
                for d in dialogues
            ]
            for name, dialogues in self.splits.items()
        }
        return FeatureSet(self.label_names, keep, self.num_speakers, splits, dict(self.meta))


def split_validation(
    train: list[Dialogue], fraction: float, seed: int
) -> tuple[list[Dialogue], list[Dialogue]]:
    """A seeded fraction of train conversations becomes validation (used when there is no official dev)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, round(len(train) * fraction))
    val_idx = set(order[:n_val].tolist())
    return [d for i, d in enumerate(train) if i not in val_idx], [
        d for i, d in enumerate(train) if i in val_idx
    ]
