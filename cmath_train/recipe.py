"""The recipe `cmath-train` uses when no `--preset` is given: chosen from the data, with the reasons.

The rules were chosen on validation splits only (never a test split) and look only at what any data set has:
which modalities, their feature sizes, and how many labelled training utterances.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Preset
from .data.types import FeatureSet

SMALL_DATA_UTTERANCES = 4000  # only named in the reasons: no setting depends on the data size
SENTENCE_EMBEDDING_MAX_DIM = 1024  # a single modality up to this size is treated like a sentence embedding


@dataclass
class Recipe:
    name: str
    model: dict[str, Any]
    loss: dict[str, Any]
    train: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # what the choice looked at

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def preset(self) -> Preset:
        """The recipe as a config.Preset (model / loss / train fields), what cmath-train and studies.compare_models apply."""
        return Preset(self.model, self.loss, self.train)

    def describe(self) -> str:
        return f"recipe {self.name!r} (chosen from the data): " + "; ".join(self.reasons)


def data_profile(fs: FeatureSet) -> dict[str, Any]:
    train = fs.splits.get("train", [])
    return {
        "modalities": list(fs.modalities),
        "feature_dims": dict(fs.feature_dims),
        "train_conversations": len(train),
        "train_utterances": int(sum(int((d.labels >= 0).sum()) for d in train)),
        "has_dev": bool(fs.splits.get("dev")),
        "classes": len(fs.label_names),
    }


def choose_recipe(fs: FeatureSet) -> Recipe:
    """The training recipe for this data (modalities present, feature sizes, data size) and why."""
    p = data_profile(fs)
    mods, n_utt = p["modalities"], p["train_utterances"]
    # Common to every recipe: an exponential moving average of the weights is validated and kept (it smooths the
    # epoch-to-epoch noise that early stopping would pick up on a small dev split), and a small d.
    model: dict[str, Any] = {"d": 128, "heads": 4}
    loss: dict[str, Any] = {}
    train: dict[str, Any] = {"batch_size": 8, "epochs": 30, "ema_decay": 0.995}
    reasons = [
        "weights averaged (EMA 0.995) and the average validated, so the selected epoch is not a noisy one"
    ]
    if len(mods) == 1:
        name = "single"
        train.update(lr=5e-4, patience=6, weight_decay=0.05, distill=1.0)
        model.update(dropout=0.4, modality_reconstruction=False)
        loss.update(use_reconstruction=False, gamma_mse=0.0, gamma_kl=0.0)
        reasons.append(
            f"one modality ({mods[0]!r}, {p['feature_dims'][mods[0]]}-d): no hierarchical distillation "
            "(g1 = g2 = 0: with one modality the fused teacher is the student itself), a linear projection "
            "instead of the reconstruction convolutions (they blur neighbouring utterances), more dropout "
            "(0.4) and weight decay (0.05) against overfitting one feature set; with --seeds N >= 2 the "
            "seeds' averaged probabilities teach N students, which generalise better than their teachers"
        )
    else:
        name = "multimodal"
        train.update(lr=1e-3, patience=8)
        reasons.append(
            f"{len(mods)} modalities: the full model (reconstruction, cross-modal fusion, distillation) with "
            "the `default` preset's settings (d 128, dropout 0.1, lr 1e-3)"
        )
    size = "small" if n_utt < SMALL_DATA_UTTERANCES else "medium or large"
    reasons.append(
        f"{n_utt} labelled training utterances ({size}): the settings above do not depend on the data size"
    )
    return Recipe(name, model, loss, train, reasons, p)
