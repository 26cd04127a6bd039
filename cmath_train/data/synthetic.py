"""The embedded default data: seeded synthetic conversations whose labels need context, speaker and modalities.

Each label is an (valence, arousal) pair, 3 x 2 = 6 emotions. The modalities see different parts of it:
text mostly shows valence, audio mostly shows arousal, visual shows both but weakly. So no single
modality can tell all six apart and the fusion of all three beats each of them. Emotions persist: a
speaker usually keeps their previous emotion and sometimes catches the previous speaker's, and each
speaker slot has its own temperament, so conversation context and speaker identity help too. Some
utterances carry no text signal at all ("ok.", "right."): only context or other modalities can label them.

`misaligned_fraction` > 0 makes one modality (`misaligned_modality`) semantically misaligned in that fraction of
utterances: its signal is drawn from another emotion than the label (uniform over the other five), as when a
speaker smiles while saying something sad. The choice uses its own random stream, so the conversations, labels
and every other feature are the same as with 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .types import Dialogue, FeatureSet

LABELS = ["sad", "angry", "neutral", "surprise", "content", "joy"]  # index = 2 * valence + arousal
VALENCE, AROUSAL = np.arange(6) // 2, np.arange(6) % 2


@dataclass
class SyntheticConfig:
    feature_dims: dict[str, int] = field(default_factory=lambda: {"t": 1024, "a": 300, "v": 342})
    num_speakers: int = 9
    conversations: dict[str, int] = field(default_factory=lambda: {"train": 300, "test": 100})
    min_len: int = 4
    max_len: int = 40
    p_keep: float = 0.55  # a speaker keeps their previous emotion
    p_contagion: float = 0.25  # ... else catches the previous utterance's emotion
    p_silent_text: float = 0.3  # utterances whose text shows no emotion
    signal: dict[str, float] = field(default_factory=lambda: {"t": 2.5, "a": 2.0, "v": 0.9})
    misaligned_fraction: float = 0.0  # utterances whose `misaligned_modality` shows another emotion
    misaligned_modality: str = "t"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.misaligned_fraction <= 1.0:
            raise ValueError(
                f"misaligned_fraction: expected a number in [0, 1], got {self.misaligned_fraction}"
            )
        if self.misaligned_modality not in self.feature_dims:
            raise ValueError(
                f"misaligned_modality: expected one of {sorted(self.feature_dims)}, "
                f"got {self.misaligned_modality!r}"
            )


def make_synthetic(cfg: SyntheticConfig | None = None) -> FeatureSet:
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    # Fixed "world": modality prototypes and speaker temperaments are shared by every split.
    dims = cfg.feature_dims
    proto = {
        "t": _unit(rng, 3, dims["t"]),  # one direction per valence
        "a": _unit(rng, 2, dims["a"]),  # one direction per arousal
        "v": _unit(rng, 6, dims["v"]),  # one direction per emotion, weak
    }
    temperament = rng.dirichlet(np.full(6, 0.7), size=cfg.num_speakers)  # each speaker slot's prior
    shown_rng = np.random.default_rng([cfg.seed, 1])  # the misaligned emotions' own stream
    splits = {}
    for split, count in cfg.conversations.items():
        dialogues = []
        for c in range(count):
            n = int(rng.integers(cfg.min_len, cfg.max_len + 1))
            speakers, labels = _conversation(rng, n, cfg, temperament)
            feats = _features(rng, labels, cfg, proto, _shown(shown_rng, labels, cfg.misaligned_fraction))
            dialogues.append(Dialogue(f"{split}_{c:04d}", feats, speakers, labels))
        splits[split] = dialogues
    meta = {
        "source": "synthetic",
        "config": asdict(cfg),
    }  # all of it: make_synthetic(SyntheticConfig(**config)) rebuilds it
    return FeatureSet(list(LABELS), dict(dims), cfg.num_speakers, splits, meta)


def _unit(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    v = rng.standard_normal((k, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _conversation(
    rng: np.random.Generator, n: int, cfg: SyntheticConfig, temperament: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n_speakers = int(rng.integers(2, min(4, cfg.num_speakers) + 1))
    speakers = np.empty(n, np.int64)
    labels = np.empty(n, np.int64)
    last: dict[int, int] = {}
    prev_speaker = -1
    for i in range(n):
        s = int(rng.integers(n_speakers)) if i >= 2 else i  # first two turns introduce speakers 0 and 1
        if s == prev_speaker and rng.random() < 0.6:  # mostly alternate turns
            s = (s + 1) % n_speakers
        r = rng.random()
        if s in last and r < cfg.p_keep:
            y = last[s]
        elif i > 0 and r < cfg.p_keep + cfg.p_contagion:
            y = int(labels[i - 1])
        else:
            y = int(rng.choice(6, p=temperament[s]))
        speakers[i], labels[i], last[s], prev_speaker = s, y, y, s
    return speakers, labels


def _shown(rng: np.random.Generator, labels: np.ndarray, fraction: float) -> np.ndarray:
    """The emotion the misaligned modality shows per utterance: the label, or in `fraction` of them another one."""
    n = len(labels)
    other = (labels + rng.integers(1, 6, n)) % 6  # uniform over the five other emotions
    return np.where(rng.random(n) < fraction, other, labels)


def _features(
    rng: np.random.Generator,
    labels: np.ndarray,
    cfg: SyntheticConfig,
    proto: dict[str, np.ndarray],
    shown: np.ndarray,
) -> dict[str, np.ndarray]:
    n, dims, sig = len(labels), cfg.feature_dims, cfg.signal
    text_on = (rng.random(n) >= cfg.p_silent_text)[:, None]
    seen = {m: shown if m == cfg.misaligned_modality else labels for m in ("t", "a", "v")}
    signal = {
        "t": sig["t"] * proto["t"][VALENCE[seen["t"]]] * text_on,
        "a": sig["a"] * proto["a"][AROUSAL[seen["a"]]],
        "v": sig["v"] * proto["v"][seen["v"]],
    }
    return {m: (signal[m] + rng.standard_normal((n, dims[m]))).astype(np.float32) for m in dims}
