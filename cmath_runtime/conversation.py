"""A conversation that grows one utterance at a time, for agents: `add()` an utterance, read `.latest`.

CMATH is bidirectional: every utterance attends to the whole conversation, future utterances included. So
adding an utterance can change the emotions of earlier ones, and each read recomputes the whole conversation
(once per change; results are cached until the next `add`): `.path == "full"`.

A causal model exported with a step graph (model.step.onnx) computes only the new utterances, from cached
attention keys/values (streaming.py): `.path == "step"`, exactly the full graph's rows, O(n d + d^2) per utterance.
`Conversation.step_batch` adds one utterance to each of many conversations in one step-graph call (servers).
Its state is plain numpy: `state_dict()` / `Conversation.from_state(model, state)`, `save()` / `load()` (np.savez,
no pickle, state.py) let an agent persist and resume a conversation.

A Conversation makes every change to its own state, under its own lock, batched stepping included: the step
graph (`streaming.Stream`) computes, the conversation records.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .model import EmotionModel, Prediction
from .state import check_state, load_state, save_state, state_meta
from .streaming import Stream
from .text import TEXT_MODALITY, check_text_features
from .utterance import Utterance
from .validation import (
    CheckedConversation,
    check_max_len,
    check_speaker,
    check_utterance,
    nonfinite_output_error,
    nonfinite_rows,
)


@dataclass(frozen=True, eq=False)
class Emotion:
    """The emotion of one utterance: its most probable label and every label's probability.

    `probs` is an array, as in `Prediction` (one row of it): (num_classes,) float32 summing to 1, its columns
    following `model.label_names`. One representation everywhere, and the one the graphs produce, servers send
    and numpy computes with; `dict(zip(model.label_names, emotion.probs))` gives a mapping when one is wanted.
    """

    label: str
    probs: np.ndarray

    @property
    def confidence(self) -> float:
        """The probability of `label` (the largest)."""
        return float(self.probs.max())


class Conversation:
    """Utterances added one by one; emotions of the newest (`.latest`) and of all so far (`.labels()`, `.probs()`).

    The model may be shared with other conversations and threads; one Conversation guards itself with a lock.
    """

    def __init__(self, model: EmotionModel) -> None:
        self.model = model
        self._utterances: list[Utterance] = []
        self._result: Prediction | None = None
        self._lock = threading.Lock()
        self._computed = 0  # utterances whose outputs were computed and finite
        graph = model.step_graph
        self._stream = Stream(graph) if graph is not None else None

    @property
    def path(self) -> str:
        """ "step" (causal model with a step graph: only new utterances are computed) or "full" (recompute)."""
        return "full" if self._stream is None else "step"

    def add(self, speaker: int, **features: Any) -> Conversation:
        """Append one utterance: a speaker id and one feature vector per modality, e.g. add(0, t=..., a=...,
        v=...), or its raw text (text="...") in place of t= when the artifact has a text encoder."""
        [utterance] = self._checked([self], [{"speaker": speaker, **features}], [f"utterances[{len(self)}]"])
        with self._lock:
            self._append(utterance)
        return self

    @classmethod
    def step_batch(
        cls, conversations: Sequence[Conversation], utterances: Sequence[Mapping[str, Any]]
    ) -> list[Emotion]:
        """Add one utterance to each of many conversations and return each one's newest emotion, in ONE
        step-graph call (servers batch concurrent conversations with this). utterances[i] is like add()'s
        arguments, {"speaker": 0, "t": ..., "a": ..., "v": ...} or {"speaker": 0, "text": "...", ...}, and
        goes to conversations[i]; each conversation ends exactly as `conversations[i].add(**utterances[i])`
        would leave it. All conversations must share one model. Nothing is changed unless every utterance is
        valid; errors name `utterances[i].field`. Models without a step graph (bidirectional) add and
        recompute one by one.
        """
        model = cls._check_batch(conversations, utterances)
        if model is None:
            return []
        checked = cls._checked(
            conversations, utterances, [f"utterances[{i}]" for i in range(len(utterances))]
        )
        if model.step_graph is None:
            out = []
            for conv, utterance in zip(conversations, checked):
                with conv._lock:
                    conv._append(utterance)
                out.append(conv.latest)
            return out
        return cls._step_all(conversations, checked)

    @staticmethod
    def _checked(
        conversations: Sequence[Conversation], given: Sequence[Any], fields: Sequence[str]
    ) -> list[Utterance]:
        """One new utterance for each conversation ({"speaker": ..., modality: vector, or "text": ...}), checked
        against its conversation; those given as text are embedded in one text-encoder call, each read with its
        conversation's past turns. Errors name `fields[i].speaker`, `.text` or `.features`."""
        model = conversations[0].model
        speakers, texts, features = [], [], []
        for conv, raw, field in zip(conversations, given, fields, strict=True):
            if not isinstance(raw, Mapping):
                want = "a dict with 'speaker' and one feature vector per modality (or 'text')"
                raise InputError(field, want, type(raw).__name__)
            if "speaker" not in raw:
                raise InputError(f"{field}.speaker", f"an integer id in [0, {model.num_speakers})", "missing")
            speakers.append(conv._check_room_and_speaker(raw["speaker"], field))
            feats = {k: v for k, v in raw.items() if k not in ("speaker", "text")}
            texts.append(check_text_features(raw["text"], feats, f"{field}.text") if "text" in raw else None)
            features.append(feats)
        given_text = [i for i, t in enumerate(texts) if t is not None]
        if given_text:
            contexts = [
                conversations[i]._context(Utterance(speakers[i], texts[i]), f"{fields[i]}.text")
                for i in given_text
            ]
            embedded = model.text_encoder.encode_utterances(
                contexts, [f"{fields[i]}.text" for i in given_text]
            )
            for i, row in zip(given_text, embedded, strict=True):
                features[i] = {**features[i], TEXT_MODALITY: row}
        return [
            Utterance(
                s, t, {m: x[0] for m, x in check_utterance(f, model.manifest, f"{field}.features").items()}
            )
            for s, t, f, field in zip(speakers, texts, features, fields, strict=True)
        ]

    @staticmethod
    def _step_all(conversations: Sequence[Conversation], utterances: Sequence[Utterance]) -> list[Emotion]:
        """Step every conversation by its checked utterance in one step-graph call, under all their locks."""
        model = conversations[0].model
        order = sorted(conversations, key=id)  # one lock order: no deadlock between concurrent batches
        for conv in order:
            conv._lock.acquire()
        try:
            streams = []
            for conv in conversations:  # utterances added with add() but not computed yet go through first
                assert conv._stream is not None
                if conv._stream.position < len(conv):
                    conv._catch_up()
                streams.append(conv._stream)
            probs, _ = Stream.step_many(
                streams, [u.speaker for u in utterances], [u.features for u in utterances], model.precision
            )
            for conv, utterance in zip(conversations, utterances):
                conv._append(utterance)
                conv._computed = len(conv)
            return [Emotion(model.label_names[int(p.argmax())], p.copy()) for p in probs]
        finally:
            for conv in order:
                conv._lock.release()

    @staticmethod
    def _check_batch(conversations: Any, utterances: Any) -> EmotionModel | None:
        """step_batch's arguments: Conversations of one model, each at most once; their model (None: none)."""
        if isinstance(conversations, Conversation) or not isinstance(conversations, Sequence):
            raise InputError("conversations", "a list of Conversation", type(conversations).__name__)
        if isinstance(utterances, (Mapping, str, bytes)) or not isinstance(utterances, Sequence):
            raise InputError("utterances", "a list of dicts, one per conversation", type(utterances).__name__)
        if len(utterances) != len(conversations):
            raise InputError(
                "utterances", f"{len(conversations)} utterances (one per conversation)", len(utterances)
            )
        if not conversations:
            return None
        model = conversations[0].model if isinstance(conversations[0], Conversation) else None
        seen: set[int] = set()
        for i, conv in enumerate(conversations):
            if not isinstance(conv, Conversation) or conv.model is not model:
                got = type(conv).__name__ if not isinstance(conv, Conversation) else "another model"
                want = "a Conversation of the same model as conversations[0]"
                raise InputError(f"conversations[{i}]", want, got)
            if id(conv) in seen:
                raise InputError(f"conversations[{i}]", "each conversation at most once per call", "a repeat")
            seen.add(id(conv))
        return model

    def _check_room_and_speaker(self, speaker: Any, field: str) -> int:
        """One more utterance fits (the artifact's max_len) and `speaker` is an id of the model."""
        check_max_len(len(self) + 1, self.model.max_len, field)
        return check_speaker(speaker, self.model.manifest, f"{field}.speaker")

    def _append(self, utterance: Utterance) -> None:
        """Record one checked utterance; the caller holds the lock."""
        self._utterances.append(utterance)
        self._result = None

    def _context(self, utterance: Utterance, field: str) -> tuple[list[Utterance], range]:
        """What the text encoder reads `utterance` with as this conversation's next one: the conversation so far
        (the encoder takes the turns its window reads)."""
        turns = self.model.text_encoder.spec.turns
        if turns is not None and not turns.streams:
            raise InputError(
                field,
                "an export whose text encoder reads past turns only, to add one utterance at a time",
                f"a text encoder that reads {turns.future} future turn(s)",
                "Classify whole conversations with model.predict([{'speakers': ..., 'texts': ...}]), or export "
                "the causal run (cmath-train --causal) for live conversations.",
            )
        with self._lock:
            past = list(self._utterances)
        return [*past, utterance], range(len(past), len(past) + 1)

    def _catch_up(self) -> tuple[np.ndarray, np.ndarray]:
        """Step through the utterances the step graph has not seen yet; (probs, embedding) of all so far."""
        assert self._stream is not None
        utterances = self._utterances
        return self._stream.catch_up(
            [u.speaker for u in utterances],
            {m: [u.features[m] for u in utterances] for m in self.model.modalities},
        )

    def __len__(self) -> int:
        return len(self._utterances)

    @property
    def texts(self) -> list[str | None]:
        """The utterances' texts (None for one added as feature vectors)."""
        return [u.text for u in self._utterances]

    @property
    def speakers(self) -> np.ndarray:
        return np.asarray([u.speaker for u in self._utterances], np.int64)

    @property
    def features(self) -> dict[str, np.ndarray]:
        """{modality: (n, d_m) float32}; the batch API (`model.predict([conversation])`) accepts a Conversation."""
        utterances = self._utterances
        return {
            m: np.stack([u.features[m] for u in utterances])
            if utterances
            else np.zeros((0, self.model.feature_dims[m]), np.float32)
            for m in self.model.modalities
        }

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
            if not self._utterances:
                raise InputError(
                    "conversation", "at least one utterance (call add() first)", "an empty conversation"
                )
            if self._result is None:
                self._result = self._compute()
            return self._result

    def _compute(self) -> Prediction:
        """How the emotions are computed: new utterances only (step path), else the whole conversation again.

        Outputs are never non-finite: if the utterances added since the last result make them so (extreme
        features), those utterances are taken back out and an InputError names them."""
        if self._stream is not None:
            probs, emb = self._catch_up()
        else:
            checked = CheckedConversation(self.features, self.speakers)
            batch_probs, batch_emb = self.model.run_padded([checked])
            probs, emb = batch_probs[0, : len(self)], batch_emb[0, : len(self)]
        bad = nonfinite_rows(probs, emb)
        if len(bad):
            start, feats = self._computed, self.features
            self._take_back(start)
            raise nonfinite_output_error(
                f"utterances[{start}:]",
                bad,
                feats,
                self.model.precision,
                f"The utterances from {start} on were taken back out of the conversation.",
            )
        self._computed = len(self)
        return Prediction([self.model.label_names[k] for k in probs.argmax(-1)], probs, emb)

    def _take_back(self, keep: int) -> None:
        """Drop the utterances from `keep` on (their outputs were not finite); the step state is rebuilt."""
        del self._utterances[keep:]
        if self._stream is not None:
            self._stream = Stream(self._stream.graph)
            if keep:
                self._catch_up()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume (state.py): what it belongs to (meta.*), speakers, texts, features and
        (step path) the cached state; numpy arrays only."""
        with self._lock:
            if self._stream is not None:
                self._catch_up()
            texts = self.texts
            out = {
                **state_meta(self.model),
                "speakers": self.speakers,
                "texts": np.array([t or "" for t in texts], dtype=str).reshape(-1),
                "texts.known": np.array([t is not None for t in texts], dtype=bool).reshape(-1),
                **{f"features.{m}": x for m, x in self.features.items()},
            }
            return {**out, **(self._stream.state_dict() if self._stream is not None else {})}

    @classmethod
    def from_state(
        cls, model: EmotionModel, state: Mapping[str, np.ndarray], source: str | Path = "state"
    ) -> Conversation:
        """A Conversation that continues exactly where the one that wrote `state` (state_dict()) stopped.

        The state is checked first (check_state): another model's state, a wrong dtype or shape, non-finite values
        or a missing key is an ArtifactError naming the key; nothing is half-loaded."""
        check_state(model, state, source)
        conv = cls(model)
        speakers = np.asarray(state["speakers"], np.int64).reshape(-1)
        features = {m: np.asarray(state[f"features.{m}"], np.float32) for m in model.modalities}
        texts = [
            str(t) if known else None for t, known in zip(state["texts"], state["texts.known"], strict=True)
        ]
        conv._utterances = [
            Utterance(int(s), t, {m: x[i] for m, x in features.items()})
            for i, (s, t) in enumerate(zip(speakers, texts, strict=True))
        ]
        if conv._stream is not None and "state.position" in state:
            conv._stream.load(state)
            conv._computed = conv._stream.position
        return conv

    def copy(self) -> Conversation:
        return Conversation.from_state(self.model, self.state_dict())

    def save(self, path: str | Path) -> None:
        """state_dict() to an .npz file (no pickle), written atomically."""
        save_state(self.state_dict(), path)

    @classmethod
    def load(cls, model: EmotionModel, path: str | Path) -> Conversation:
        """A Conversation from a file written by save(); anything else is an ArtifactError naming what is wrong."""
        return cls.from_state(model, load_state(path), path)

    def _emotion(self, result: Prediction, i: int) -> Emotion:
        return Emotion(result.labels[i], result.probs[i].copy())
