"""The rows parity is measured on: the run's own validation conversations when its data can be rebuilt, else
generated conversations of the right shape (features drawn around the model's stored train mean/std).

Every set ends with one batch holding a fully padded conversation, so "padded rows stay finite" is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.batching import pad_conversations
from cmath_train.checkpoint import Checkpoint
from cmath_train.config import ModelConfig

Feeds = dict[
    str, np.ndarray
]  # graph input name -> array: t/a/v (B, N, d_m) float32, speaker int64, mask bool


@dataclass
class ParityData:
    batches: list[Feeds]
    source: str  # where the rows come from, in words
    conversations: int
    rows: int  # real (unpadded) utterances


def load_parity_data(
    ckpt: Checkpoint, max_len: int, max_batch: int, limit: int = 128, batch_size: int = 16
) -> ParityData:
    cfg = ckpt.model_cfg
    dialogues, source = validation_conversations(ckpt)
    if dialogues is None:
        dialogues, source = generated_conversations(ckpt, 48), f"generated conversations ({source})"
    too_long = sum(len(s) > max_len for _, s in dialogues)
    dialogues = [(f, s) for f, s in dialogues if 0 < len(s) <= max_len][:limit]
    if too_long:
        source += f"; {too_long} conversations longer than --max-len {max_len} left out"
    size = max(1, min(batch_size, max_batch))
    batches = [_pad(dialogues[i : i + size], cfg.modalities) for i in range(0, len(dialogues), size)]
    if max_batch >= 2:
        padded = _pad(dialogues[:1], cfg.modalities, extra_empty=1)  # conversation 2 is all padding
        batches.append(padded)
    return ParityData(batches, source, len(dialogues), sum(len(s) for _, s in dialogues))


def _pad(
    dialogues: list[tuple[dict[str, np.ndarray], np.ndarray]],
    modalities: tuple[str, ...],
    extra_empty: int = 0,
) -> Feeds:
    feats, speaker, mask = pad_conversations([f for f, _ in dialogues], [s for _, s in dialogues], modalities)
    if extra_empty:
        feats = {
            m: np.concatenate([x, np.zeros((extra_empty, *x.shape[1:]), x.dtype)]) for m, x in feats.items()
        }
        speaker = np.concatenate([speaker, np.zeros((extra_empty, speaker.shape[1]), speaker.dtype)])
        mask = np.concatenate([mask, np.zeros((extra_empty, mask.shape[1]), bool)])
    return {**feats, "speaker": speaker, "mask": mask}


def validation_conversations(ckpt: Checkpoint) -> tuple[list | None, str]:
    """(features, speakers) of the run's validation split, rebuilt as training built it; (None, why) otherwise."""
    dialogues, source = validation_dialogues(ckpt)
    return (None if dialogues is None else [(d.features, d.speakers) for d in dialogues]), source


def validation_texts(
    ckpt: Checkpoint, limit: int = 100
) -> list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None:
    """(texts, speakers, the other modalities' features) of up to `limit` validation conversations, when the run's
    features were made from text and its data can be rebuilt; None otherwise."""
    dialogues, _ = validation_dialogues(ckpt)
    if dialogues is None or any(d.texts is None for d in dialogues):
        return None
    return [
        (list(d.texts), [int(s) for s in d.speakers], {m: x for m, x in d.features.items() if m != "t"})
        for d in dialogues[:limit]
        if len(d)
    ]


def validation_dialogues(ckpt: Checkpoint) -> tuple[list | None, str]:
    """The run's validation dialogues, rebuilt as training built them; (None, why) otherwise."""
    from cmath_train.data import load_data
    from cmath_train.train import make_splits

    cfg, data = ckpt.model_cfg, ckpt.extra.get("data") or {}
    source = data.get("source")
    spec = "synthetic" if source == "synthetic" else data.get("path")  # a pickle records its path
    if not spec or (spec != "synthetic" and not Path(spec).exists()):
        kind = (
            source.get("kind", "a features directory") if isinstance(source, dict) else source or "unrecorded"
        )
        return None, f"the run's data ({kind}) cannot be located from its checkpoint"
    try:
        if spec == "synthetic":  # rebuilt from the generator config the run recorded
            from cmath_train.data.synthetic import SyntheticConfig, make_synthetic

            fs = make_synthetic(SyntheticConfig(**data["config"]))
        else:
            fs = load_data(spec)
    except Exception as e:  # noqa: BLE001 - any failure to rebuild the data only means: use generated rows
        return None, f"the run's data could not be read again ({type(e).__name__}: {e})"
    if {
        m: fs.feature_dims.get(m) for m in cfg.modalities
    } != cfg.feature_dims or fs.num_speakers > cfg.num_speakers:
        return None, f"{spec} has other feature sizes or more speakers than the run"
    fs = fs.select(cfg.modalities)
    splits = make_splits(fs, ckpt.train_cfg.val_fraction, ckpt.train_cfg.seed)
    if not splits.val:
        return None, f"{spec} has no validation conversations"
    return list(splits.val), f"validation split of {spec} ({splits.val_source})"


def generated_conversations(ckpt: Checkpoint, count: int, seed: int = 0) -> list:
    """Conversations of 1-40 utterances with features ~ N(train mean, train std) of the model's own buffers."""
    cfg, rng = ckpt.model_cfg, np.random.default_rng(seed)
    state = ckpt.model.state_dict()
    out = []
    for _ in range(count):
        n = int(rng.integers(1, 41))
        feats = drawn_features(state, cfg, n, rng)
        out.append((feats, rng.integers(0, cfg.num_speakers, n).astype(np.int64)))
    return out


def drawn_features(
    state: dict[str, Any], cfg: ModelConfig, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """n utterances of each modality drawn as train mean + train std * N(0, 1), from the model's standardisation
    buffers (its state_dict): in distribution, where plain N(0, 1) would put a feature that was near-constant in
    training far out."""
    feats = {}
    for m in cfg.modalities:
        mean = _buffer(state, f"standardize.{m}.mean", np.zeros(cfg.feature_dims[m]))
        std = _buffer(state, f"standardize.{m}.std", np.ones(cfg.feature_dims[m]))
        feats[m] = (mean + std * rng.standard_normal((n, cfg.feature_dims[m]))).astype(np.float32)
    return feats


def _buffer(state: dict, suffix: str, default: np.ndarray) -> np.ndarray:
    """A model's standardisation buffer, wherever the model keeps it (CMATH: standardize.*, baselines: inputs.*)."""
    for key, value in state.items():
        if key == suffix or key.endswith("." + suffix):
            return value.detach().cpu().numpy().astype(np.float64)
    return default
