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
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import streaming
from .errors import ArtifactError, InputError
from .files import atomic_open
from .validation import (
    CheckedConversation,
    check_speaker,
    check_utterance,
    nonfinite_output_error,
    nonfinite_rows,
)

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
        self._texts: list[str | None] = []  # None: added as features (t=...)
        self._features: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
        self._result: Prediction | None = None
        self._lock = threading.Lock()
        self._computed = 0  # utterances whose outputs were computed and finite
        graph = model.step_graph
        self._stream = streaming.Stream(graph) if graph is not None else None

    @property
    def path(self) -> str:
        """"step" (causal model with a step graph: only new utterances are computed) or "full" (recompute)."""
        return "full" if self._stream is None else "step"

    def add(self, speaker: int, **features: Any) -> Conversation:
        """Append one utterance: a speaker id and one feature vector per modality, e.g. add(0, t=..., a=..., v=...)."""
        spec = self.model.manifest
        n = len(self._speakers)
        field = f"utterances[{n}]"
        if n >= spec.max_len:
            raise InputError(field, f"at most {spec.max_len} utterances (the artifact's max_len)", f"utterance {n + 1}",
                             "Start a new Conversation with the most recent utterances.")
        speaker = check_speaker(speaker, spec, f"{field}.speaker")
        text = None
        if "text" in features:  # raw text instead of t=: the artifact's text encoder reads it with its past turns
            from .text import embed_utterances

            (text,) = embed_utterances(self.model, [self.past_turns(f"{field}.text")], [int(speaker)],
                                       [features.pop("text")], [features], [f"{field}.text"])
        rows = check_utterance(features, spec, f"{field}.features")
        with self._lock:
            self._speakers.append(int(speaker))
            self._texts.append(text)
            for m in spec.modalities:
                self._features[m].append(rows[m][0])
            self._result = None
        return self

    def past_turns(self, field: str) -> tuple[list[str], list[int]]:
        """The texts and speakers the text encoder reads with this conversation's next utterance."""
        from .text import past_turns

        turns = self.model.text_encoder.spec.turns
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
        """How the emotions are computed: new utterances only (step path), else the whole conversation again.

        Outputs are never non-finite: if the utterances added since the last result make them so (extreme
        features), those utterances are taken back out and an InputError names them."""
        from .model import Prediction

        if self._stream is not None:
            probs, emb = self._stream.catch_up(self._speakers, self._features)
        else:
            checked = CheckedConversation(self.features, self.speakers)
            batch_probs, batch_emb = self.model.run_padded([checked])
            probs, emb = batch_probs[0, :len(self)], batch_emb[0, :len(self)]
        bad = nonfinite_rows(probs, emb)
        if len(bad):
            start, feats = self._computed, self.features
            self._take_back(start)
            raise nonfinite_output_error(f"utterances[{start}:]", bad, feats, self.model.precision,
                                         f"The utterances from {start} on were taken back out of the conversation.")
        self._computed = len(self)
        return Prediction([self.model.label_names[k] for k in probs.argmax(-1)], probs, emb)

    def _take_back(self, keep: int) -> None:
        """Drop the utterances from `keep` on (their outputs were not finite); the step state is rebuilt."""
        del self._speakers[keep:]
        del self._texts[keep:]
        for rows in self._features.values():
            del rows[keep:]
        if self._stream is not None:
            self._stream = streaming.Stream(self._stream.graph)
            if keep:
                self._stream.catch_up(self._speakers, self._features)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume: what it belongs to (meta.*), speakers, features and (step path) the cached
        state; numpy arrays only."""
        with self._lock:
            if self._stream is not None:
                self._stream.catch_up(self._speakers, self._features)
            out = {**state_meta(self.model), "speakers": self.speakers,
                   "texts": np.array([t or "" for t in self._texts], dtype=str).reshape(-1),
                   "texts.known": np.array([t is not None for t in self._texts], dtype=bool).reshape(-1),
                   **{f"features.{m}": x for m, x in self.features.items()}}
            return {**out, **(self._stream.state_dict() if self._stream is not None else {})}

    @classmethod
    def from_state(cls, model: EmotionModel, state: dict[str, np.ndarray], source: str | Path = "state") -> Conversation:
        """A Conversation that continues exactly where the one that wrote `state` (state_dict()) stopped.

        The state is checked first (check_state): another model's state, a wrong dtype or shape, non-finite values
        or a missing key is an ArtifactError naming the key; nothing is half-loaded."""
        check_state(model, state, source)
        conv = cls(model)
        speakers = np.asarray(state["speakers"], np.int64).reshape(-1)
        for m in model.modalities:
            conv._features[m] = list(np.asarray(state[f"features.{m}"], np.float32))
        conv._speakers = [int(s) for s in speakers]
        conv._texts = [str(t) if known else None for t, known in zip(state["texts"], state["texts.known"], strict=True)]
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
        return Emotion(result.labels[i], dict(zip(self.model.label_names, map(float, result.probs[i]))))


STATE_FORMAT = "cmath-conversation-state"
STATE_VERSION = 2  # 2: the utterances' texts (the text encoder reads past turns)


def state_meta(model: EmotionModel) -> dict[str, np.ndarray]:
    """What a state belongs to: its format and version, and the sha256 of the artifact's graph (model.onnx)."""
    return {"meta.format": np.asarray(STATE_FORMAT), "meta.version": np.asarray(STATE_VERSION, np.int64),
            "meta.model_sha256": np.asarray(model.manifest.artifacts["fp32"].sha256)}


def save_state(state: dict[str, np.ndarray], path: str | Path) -> None:
    """Write a state with np.savez (no pickle) in one rename: a crash never leaves half a file under `path`."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **state)


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read an .npz state (allow_pickle=False). Not an npz, object arrays, a truncated or corrupt file ->
    ArtifactError naming the file (and the key, when one key is unreadable)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(path, "no such state file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "numpy would need pickle to read it, which cmath never uses" if "pickle" in str(e) else str(e)
        raise ArtifactError(path, f"not a conversation state (.npz written by Conversation.save): {why}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ArtifactError(path, f"not a conversation state: a single {type(data).__name__}, not an .npz archive")
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:  # object arrays need pickle, which is never allowed
                raise ArtifactError(path, f"state[{key!r}]: cannot be read without pickle ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ArtifactError(path, f"state[{key!r}]: truncated or corrupt ({type(e).__name__}: {e})") from None
    return out


def check_state(model: EmotionModel, state: Any, source: str | Path = "state") -> None:
    """Everything Conversation.from_state relies on; ArtifactError(source, "state['key']: ...") otherwise."""
    def fail(key: str, problem: str) -> ArtifactError:
        return ArtifactError(source, f"state[{key!r}]: {problem}")

    def get(key: str, kinds: str, shape: tuple[int | None, ...] | None = None, finite: bool = False) -> np.ndarray:
        if key not in state:
            raise fail(key, "missing")
        arr = state[key]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr) if isinstance(arr, (int, float, str, list, tuple, np.generic)) else None
            if arr is None:
                raise fail(key, f"expected a numpy array, got {type(state[key]).__name__}")
        if arr.dtype.kind not in kinds:
            raise fail(key, f"expected dtype kind {kinds!r}, got {arr.dtype}")
        if shape is not None and (arr.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, arr.shape))):
            raise fail(key, f"expected shape {tuple('any' if w is None else w for w in shape)}, got {arr.shape}")
        if finite and not np.isfinite(arr).all():
            raise fail(key, "holds NaN or inf")
        return arr

    if not isinstance(state, Mapping):
        raise ArtifactError(source, f"a state is a dict of numpy arrays, got {type(state).__name__}")
    if str(get("meta.format", "U", ())) != STATE_FORMAT:
        raise fail("meta.format", f"expected {STATE_FORMAT!r}, got {str(state['meta.format'])!r}")
    if int(get("meta.version", "iu", ())) != STATE_VERSION:
        raise fail("meta.version", f"unsupported version {int(state['meta.version'])} (this cmath reads {STATE_VERSION})")
    want = model.manifest.artifacts["fp32"].sha256
    got = str(get("meta.model_sha256", "U", ()))
    if got != want:
        raise fail("meta.model_sha256", f"the state belongs to another model (graph sha256 {got[:16]}..., this model "
                                        f"has {want[:16]}...)")
    speakers = get("speakers", "iu", (None,))
    n = len(speakers)
    if n > model.manifest.max_len:
        raise fail("speakers", f"at most {model.manifest.max_len} utterances (max_len), got {n}")
    if n and (speakers.min() < 0 or speakers.max() >= model.num_speakers):
        raise fail("speakers", f"speaker ids in [0, {model.num_speakers}), got {speakers.min()}..{speakers.max()}")
    for m in model.modalities:
        get(f"features.{m}", "f", (n, model.feature_dims[m]), finite=True)
    get("texts", "U", (n,))
    get("texts.known", "b", (n,))
    graph = model.step_graph
    if graph is None or "state.position" not in state:
        return
    if str(get("state.sha256", "U", ())) != graph.sha256:
        raise fail("state.sha256", "the cached state belongs to another step graph")
    position = int(get("state.position", "iu", ()))
    if not 0 <= position <= min(n, graph.max_len):
        raise fail("state.position", f"expected 0..{min(n, graph.max_len)}, got {position}")
    for spec in graph.state_spec:
        key, shape = spec["input"], tuple(spec["shape"])
        get(f"state.{key}", "f", (position, *shape[1:]) if spec["update"] == "append" else shape, finite=True)
    if position:
        probs = get("state.probs", "f", (position, model.manifest.num_classes), finite=True)
        get("state.embedding", "f", (position, model.manifest.d), finite=True)
        if not np.allclose(probs.sum(-1), 1.0, atol=1e-3):
            raise fail("state.probs", "rows do not sum to 1")
