"""A conversation that grows one utterance at a time, for agents: `add()` an utterance, read `.latest`.

CMATH is bidirectional: every utterance attends to the whole conversation, future utterances included. So
adding an utterance can change the emotions of earlier ones, and each read recomputes the whole conversation
(once per change; results are cached until the next `add`): `.path == "full"`.

A causal model exported with a step graph (model.step.onnx) computes only the new utterances, from cached
attention keys/values (streaming.py): `.path == "step"`, exactly the full graph's rows, O(n d + d^2) per utterance.
Its state is plain numpy: `state_dict()` / `Conversation.from_state(model, state)`, `save()` / `load()` (np.savez,
no pickle) let an agent persist and resume a conversation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import streaming
from .errors import InputError
from .validation import check_speaker, check_utterance

if TYPE_CHECKING:
    from .model import EmotionModel, Prediction


@dataclass(frozen=True)
class Emotion:
    """The emotion of one utterance."""

    label: str
    probs: dict[str, float]  # label name -> probability

    @property
    def confidence(self) -> float:
        return self.probs[self.label]


class Conversation:
    """Utterances added one by one; emotions of the newest (`.latest`) and of all so far (`.labels()`, `.probs()`).

    The model may be shared with other conversations and threads; one Conversation guards itself with a lock.
    """

    def __init__(self, model: EmotionModel) -> None:
        self.model = model
        self._speakers: list[int] = []
        self._features: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
        self._result: Prediction | None = None
        self._lock = threading.Lock()
        graph = model.step_graph
        self._stream = streaming.Stream(graph) if graph is not None else None

    @property
    def path(self) -> str:
        """"step" (causal model with a step graph: only new utterances are computed) or "full" (recompute)."""
        return "full" if self._stream is None else "step"

    def add(self, speaker: int, **features: Any) -> Conversation:
        """Append one utterance: a speaker id and one feature vector per modality, e.g. add(0, t=..., a=..., v=...)."""
        if "text" in features:  # raw text instead of t=: embedded by the artifact's text encoder (text.py)
            from .text import utterance_features

            features = utterance_features(self.model, features.pop("text"), features, f"utterances[{len(self)}].text")
        spec = self.model.manifest
        n = len(self._speakers)
        field = f"utterances[{n}]"
        if n >= spec.max_len:
            raise InputError(field, f"at most {spec.max_len} utterances (the artifact's max_len)", f"utterance {n + 1}",
                             "Start a new Conversation with the most recent utterances.")
        speaker = check_speaker(speaker, spec, f"{field}.speaker")
        rows = check_utterance(features, spec, f"{field}.features")
        with self._lock:
            self._speakers.append(int(speaker))
            for m in spec.modalities:
                self._features[m].append(rows[m][0])
            self._result = None
        return self

    def __len__(self) -> int:
        return len(self._speakers)

    @property
    def speakers(self) -> np.ndarray:
        return np.asarray(self._speakers, np.int64)

    @property
    def features(self) -> dict[str, np.ndarray]:
        """{modality: (n, d_m) float32}; the batch API (`model.predict([conversation])`) accepts a Conversation."""
        return {m: np.stack(rows) if rows else np.zeros((0, self.model.feature_dims[m]), np.float32)
                for m, rows in self._features.items()}

    @property
    def latest(self) -> Emotion:
        """The emotion of the newest utterance."""
        result = self.prediction()
        return self._emotion(result, len(result) - 1)

    def labels(self) -> list[str]:
        """The label of every utterance so far (earlier ones may change as the conversation goes on)."""
        return list(self.prediction().labels)

    def probs(self) -> np.ndarray:
        """(n, num_classes) probabilities of every utterance so far; columns follow model.label_names."""
        return self.prediction().probs.copy()

    def emotions(self) -> list[Emotion]:
        result = self.prediction()
        return [self._emotion(result, i) for i in range(len(result))]

    def prediction(self) -> Prediction:
        """The model's output for the whole conversation so far (computed once per change)."""
        with self._lock:
            if not self._speakers:
                raise InputError("conversation", "at least one utterance (call add() first)", "an empty conversation")
            if self._result is None:
                self._result = self._compute()
            return self._result

    def _compute(self) -> Prediction:
        """How the emotions are computed: new utterances only (step path), else the whole conversation again."""
        if self._stream is not None:
            from .model import Prediction

            probs, emb = self._stream.catch_up(self._speakers, self._features)
            return Prediction([self.model.label_names[k] for k in probs.argmax(-1)], probs, emb)
        return self.model.predict([{"speakers": self.speakers, "features": self.features}])[0]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume: speakers, features and (step path) the cached state; numpy arrays only."""
        with self._lock:
            if self._stream is not None:
                self._stream.catch_up(self._speakers, self._features)
            out = {"speakers": self.speakers, **{f"features.{m}": x for m, x in self.features.items()}}
            return {**out, **(self._stream.state_dict() if self._stream is not None else {})}

    @classmethod
    def from_state(cls, model: EmotionModel, state: dict[str, np.ndarray]) -> Conversation:
        """A Conversation that continues exactly where the one that wrote `state` (state_dict()) stopped."""
        conv = cls(model)
        speakers = np.asarray(state["speakers"], np.int64).reshape(-1)
        if len(speakers) > model.manifest.max_len:
            raise InputError("state['speakers']", f"at most {model.manifest.max_len} utterances", len(speakers))
        for m in model.modalities:
            rows = np.asarray(state[f"features.{m}"], np.float32)
            if rows.shape != (len(speakers), model.feature_dims[m]):
                raise InputError(f"state['features.{m}']", f"shape {(len(speakers), model.feature_dims[m])}", rows.shape)
            conv._features[m] = list(rows)
        conv._speakers = [int(s) for s in speakers]
        if conv._stream is not None and "state.position" in state:
            conv._stream.load(state)
        return conv

    def copy(self) -> Conversation:
        return Conversation.from_state(self.model, self.state_dict())

    def save(self, path: str | Path) -> None:
        """state_dict() to an .npz file (no pickle)."""
        streaming.save_state(self.state_dict(), path)

    @classmethod
    def load(cls, model: EmotionModel, path: str | Path) -> Conversation:
        return cls.from_state(model, streaming.load_state(path))

    def _emotion(self, result: Prediction, i: int) -> Emotion:
        return Emotion(result.labels[i], dict(zip(self.model.label_names, map(float, result.probs[i]))))
