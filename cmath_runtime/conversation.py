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
from .text import embed_utterances, past_turns
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
        self._speakers: list[int] = []
        self._texts: list[str | None] = []  # None: added as features (t=...)
        self._features: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
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
        field = f"utterances[{len(self)}]"
        speaker = self._check_room_and_speaker(speaker, field)
        text = None
        if "text" in features:  # the artifact's text encoder reads it with its past turns
            (text,) = embed_utterances(
                lambda: self.model.text_encoder,
                [self.past_turns(f"{field}.text")],
                [speaker],
                [features.pop("text")],
                [features],
                [f"{field}.text"],
            )
        rows = check_utterance(features, self.model.manifest, f"{field}.features")
        with self._lock:
            self._append(speaker, text, {m: x[0] for m, x in rows.items()})
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
        speakers, feats = [], []
        for i, (conv, utt) in enumerate(zip(conversations, utterances)):
            if not isinstance(utt, Mapping):
                raise InputError(
                    f"utterances[{i}]",
                    "a dict with 'speaker' and one feature vector per modality (or 'text')",
                    type(utt).__name__,
                )
            if "speaker" not in utt:
                raise InputError(
                    f"utterances[{i}].speaker", f"an integer id in [0, {model.num_speakers})", "missing"
                )
            speakers.append(conv._check_room_and_speaker(utt["speaker"], f"utterances[{i}]"))
            feats.append({k: v for k, v in utt.items() if k != "speaker"})
        texts: list[str | None] = [None] * len(feats)
        given = [i for i, f in enumerate(feats) if "text" in f]
        if given:  # one text-encoder call for every utterance given as text
            fields = [f"utterances[{i}].text" for i in given]
            embedded = embed_utterances(
                lambda: model.text_encoder,
                [conversations[i].past_turns(f) for i, f in zip(given, fields)],
                [speakers[i] for i in given],
                [feats[i].pop("text") for i in given],
                [feats[i] for i in given],
                fields,
            )
            for i, checked in zip(given, embedded):
                texts[i] = checked
        rows = [
            {m: x[0] for m, x in check_utterance(f, model.manifest, f"utterances[{i}].features").items()}
            for i, f in enumerate(feats)
        ]
        if model.step_graph is None:
            out = []
            for conv, speaker, text, row in zip(conversations, speakers, texts, rows):
                with conv._lock:
                    conv._append(speaker, text, row)
                out.append(conv.latest)
            return out
        order = sorted(conversations, key=id)  # one lock order: no deadlock between concurrent batches
        for conv in order:
            conv._lock.acquire()
        try:
            streams = []
            for conv in conversations:  # utterances added with add() but not computed yet go through first
                assert conv._stream is not None
                if conv._stream.position < len(conv):
                    conv._stream.catch_up(conv._speakers, conv._features)
                streams.append(conv._stream)
            probs, _ = Stream.step_many(streams, speakers, rows, model.precision)
            for conv, speaker, text, row in zip(conversations, speakers, texts, rows):
                conv._append(speaker, text, row)
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

    def _append(self, speaker: int, text: str | None, row: Mapping[str, np.ndarray]) -> None:
        """Record one checked utterance ({modality: (d_m,)}); the caller holds the lock."""
        self._speakers.append(speaker)
        self._texts.append(text)
        for m in self.model.modalities:
            self._features[m].append(row[m])
        self._result = None

    def past_turns(self, field: str) -> tuple[list[str], list[int]]:
        """The texts and speakers the text encoder reads with this conversation's next utterance."""
        turns = self.model.text_encoder.spec.turns
        if turns is not None and not turns.streams:
            raise InputError(
                field,
                "an export whose text encoder reads past turns only, to add one utterance at a time",
                f"a text encoder that reads {turns.future} future turn(s)",
                "Classify whole conversations with model.predict([{'speakers': ..., 'texts': ...}]), or export "
                "the causal run (cmath-train --causal) for live conversations.",
            )
        return past_turns(self._texts, self._speakers, turns.window if turns is not None else 0, field)

    def __len__(self) -> int:
        return len(self._speakers)

    @property
    def texts(self) -> list[str | None]:
        """The utterances' texts (None for one added as feature vectors)."""
        return list(self._texts)

    @property
    def speakers(self) -> np.ndarray:
        return np.asarray(self._speakers, np.int64)

    @property
    def features(self) -> dict[str, np.ndarray]:
        """{modality: (n, d_m) float32}; the batch API (`model.predict([conversation])`) accepts a Conversation."""
        return {
            m: np.stack(rows) if rows else np.zeros((0, self.model.feature_dims[m]), np.float32)
            for m, rows in self._features.items()
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
            if not self._speakers:
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
            probs, emb = self._stream.catch_up(self._speakers, self._features)
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
        del self._speakers[keep:]
        del self._texts[keep:]
        for rows in self._features.values():
            del rows[keep:]
        if self._stream is not None:
            self._stream = Stream(self._stream.graph)
            if keep:
                self._stream.catch_up(self._speakers, self._features)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume (state.py): what it belongs to (meta.*), speakers, texts, features and
        (step path) the cached state; numpy arrays only."""
        with self._lock:
            if self._stream is not None:
                self._stream.catch_up(self._speakers, self._features)
            out = {
                **state_meta(self.model),
                "speakers": self.speakers,
                "texts": np.array([t or "" for t in self._texts], dtype=str).reshape(-1),
                "texts.known": np.array([t is not None for t in self._texts], dtype=bool).reshape(-1),
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
        for m in model.modalities:
            conv._features[m] = list(np.asarray(state[f"features.{m}"], np.float32))
        conv._speakers = [int(s) for s in speakers]
        conv._texts = [
            str(t) if known else None for t, known in zip(state["texts"], state["texts.known"], strict=True)
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
