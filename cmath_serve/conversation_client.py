"""The in-process `Conversation` API against a cmath-serve replica or a balancer in front of many.

    from cmath_serve.conversation_client import ServeClient

    client = ServeClient("127.0.0.1:8001")           # one server's gRPC port, or the balancer's
    conv = client.conversation()
    emotion = conv.add(0, t=t0, a=a0, v=v0)           # this utterance's Emotion (label, probs, confidence)
    emotion = conv.add(1, text="Oh my God!")          # raw text, where the server reads it
    conv.add(0, t=t2, a=a2, v=v2, end=True)           # the last one: the server frees the conversation
    [pred] = client.predict([conv, {"speakers": [0, 1], "features": {...}}])   # whole conversations (`cmath`)

Light: tritonclient (gRPC) and numpy; utterances are checked before they are sent by cmath_runtime's own
validation (the same field names and messages as a local Conversation), against the model description the
server publishes (config parameter `client_spec`).

How a conversation survives replicas that come and go: every step carries the routing header
`x-cmath-conversation: <sequence id>` (the balancer hashes it, so all steps of a conversation reach one
replica), and the conversation keeps what it sent. When the server answers that it does not hold the sequence
(the replica was restarted or replaced, or the balancer moved the conversation to another one after its
replica died), or the answer was lost on the way (the step may or may not have been applied), the conversation
replays its history from `sequence_start=True` and sends the new utterance again: the caller sees the answer,
never the failover. A replay recomputes exactly what the lost replica held, so answers are unchanged. Transport
failures are retried `attempts` times with doubling backoff, then UnreachableError; a bad utterance is an
InputError naming the field, before anything is sent.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from cmath_runtime import Emotion, Prediction
from cmath_runtime.errors import InputError
from cmath_runtime.manifest import Manifest
from cmath_runtime.validation import check_features, check_speaker, check_speakers, check_utterance

from .balancer import HEADER
from .client import infer_inputs
from .errors import ConversationLimitError, RequestError, UnreachableError
from .repository import CLASSIFY_MODEL, STREAM_MODEL, TEXT_MODALITY

T = TypeVar("T")
UNKNOWN_SEQUENCE = ("must specify the START flag", "sequence_id: expected a live conversation")
REQUEST_ERRORS = (
    "StatusCode.INVALID_ARGUMENT",
    "StatusCode.NOT_FOUND",
    "StatusCode.UNIMPLEMENTED",
    "StatusCode.FAILED_PRECONDITION",
    "StatusCode.OUT_OF_RANGE",
    "StatusCode.ALREADY_EXISTS",
)


@dataclass(frozen=True)
class ClientOptions:
    """How hard the client tries before it gives up, and how long one request may take."""

    attempts: int = (
        6  # tries of one call (an utterance, a batch, the model description) on transport failures
    )
    backoff_s: float = 0.1  # wait after the first failure; doubles after each, at most max_backoff_s
    max_backoff_s: float = 2.0
    timeout_s: float = 120.0  # one request's deadline

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: expected at least 1, got {self.attempts}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= 0 and self.timeout_s > 0):
            raise ValueError(
                f"backoff_s / max_backoff_s / timeout_s: expected >= 0 / >= 0 / > 0, got "
                f"{self.backoff_s} / {self.max_backoff_s} / {self.timeout_s}"
            )


def error_kind(error: Exception) -> str:
    """ "unknown_sequence" (replay), "limit" (refused: too many live conversations), "request" (the request is
    bad: retrying cannot help) or "transport" (retry)."""
    message, status = str(error), str(getattr(error, "status", lambda: None)() or "")
    if any(s in message for s in UNKNOWN_SEQUENCE):
        return "unknown_sequence"
    if "--max-conversations" in message:
        return "limit"
    if status in REQUEST_ERRORS:
        return "request"
    return "transport"


@dataclass
class ClientStats:
    """What the client did beyond one request per call (thread-safe counters)."""

    retries: int = 0  # requests sent again after a transport failure
    replays: int = 0  # conversations replayed from their first utterance
    replayed_utterances: int = 0
    replay_seconds: list[float] = field(default_factory=list)  # wall time of each replay
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, **add: float) -> None:
        with self._lock:
            for key, value in add.items():
                if key == "replay_seconds":
                    self.replay_seconds.append(value)
                else:
                    setattr(self, key, getattr(self, key) + int(value))


class ServeClient:
    """A cmath-serve server or a balancer in front of replicas, at `url` (HOST:GRPC_PORT)."""

    def __init__(self, url: str, options: ClientOptions | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.options = options or ClientOptions()
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self._spec: Manifest | None = None
        self._text_input = ""
        self._spec_lock = threading.Lock()
        self.stats = ClientStats()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def spec(self) -> Manifest:
        """The served model's description (modalities, feature sizes, speakers, labels, max_len, batch size)."""
        with self._spec_lock:
            if self._spec is None:
                config = self.call(
                    lambda: self._client.get_model_config(
                        STREAM_MODEL, as_json=True, client_timeout=self.options.timeout_s
                    ),
                    f"the model description of {STREAM_MODEL!r}",
                )
                params = {k: v["string_value"] for k, v in config["config"].get("parameters", {}).items()}
                if "client_spec" not in params:
                    raise RequestError(
                        f"{self.url}: expected a cmath-serve server (model {STREAM_MODEL!r} with the "
                        f"parameter 'client_spec'), got a model without it: update that server"
                    )
                spec = json.loads(params["client_spec"])
                self._text_input = params.get("text_input", "off: not said")
                self._spec = Manifest(
                    modalities=tuple(spec["modalities"]),
                    feature_dims=dict(spec["feature_dims"]),
                    num_speakers=int(spec["num_speakers"]),
                    num_classes=int(spec["num_classes"]),
                    label_names=tuple(spec["label_names"]),
                    d=int(spec["d"]),
                    causal=bool(spec["causal"]),
                    max_batch=int(spec["max_batch"]),
                    max_len=int(spec["max_len"]),
                    artifacts={},
                )
            return self._spec

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.spec.label_names

    def conversation(self, sequence_id: int | None = None) -> RemoteConversation:
        """A new, empty conversation (its sequence id: random 63-bit unless given)."""
        if sequence_id is not None and not (isinstance(sequence_id, int) and 0 < sequence_id < 2**64):
            raise InputError("sequence_id", "an integer in [1, 2**64)", repr(sequence_id))
        return RemoteConversation(self, sequence_id or secrets.randbits(63) or 1)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn() retried on transport failures (bounded, doubling backoff); UnreachableError after the last
        attempt; a refused or bad request raises ConversationLimitError / RequestError at once."""
        from tritonclient.utils import InferenceServerException

        last: Exception | None = None
        started = time.monotonic()
        for attempt in range(self.options.attempts):
            if attempt:
                self.stats.count(retries=1)
                time.sleep(min(self.options.backoff_s * 2 ** (attempt - 1), self.options.max_backoff_s))
            try:
                return fn()
            except InferenceServerException as e:
                kind = error_kind(e)
                if kind == "limit":
                    raise ConversationLimitError(e.message()) from None
                if kind != "transport":
                    raise RequestError(f"{what}: {e.message()}") from None
                last = e
        raise UnreachableError(
            f"{self.url}: no answer for {what} after {self.options.attempts} attempts in "
            f"{time.monotonic() - started:.1f} s (last error: {last}); is the server or balancer "
            f"running and reachable?"
        )

    def infer(self, model: str, arrays: dict[str, np.ndarray], **kwargs: Any) -> Any:
        """One request, no retries (raises tritonclient's InferenceServerException)."""
        return self._client.infer(
            model, infer_inputs(self._grpc, arrays), client_timeout=self.options.timeout_s, **kwargs
        )

    def utterance(self, index: int, speaker: Any, features: dict[str, Any]) -> dict[str, np.ndarray]:
        """One utterance checked like cmath_runtime's Conversation.add, as the request's arrays."""
        spec = self.spec
        where = f"utterances[{index}]"
        if index >= spec.max_len:
            raise InputError(
                where,
                f"at most {spec.max_len} utterances (the artifact's max_len)",
                f"utterance {index + 1}",
                "Start a new conversation with the most recent utterances.",
            )
        arrays: dict[str, np.ndarray] = {}
        check = spec
        features = dict(features)
        if "text" in features:
            text = features.pop("text")
            self._check_text_input(f"{where}.text")
            if not isinstance(text, str):
                raise InputError(f"{where}.text", "a str (the utterance's text)", type(text).__name__)
            arrays["text"] = np.array([[text.encode("utf-8")]], dtype=object)
            check = dataclasses.replace(
                spec, modalities=tuple(m for m in spec.modalities if m != TEXT_MODALITY)
            )
        rows = check_utterance(features, check, f"{where}.features")
        speaker = check_speaker(speaker, spec, f"{where}.speaker")
        return {**rows, "speaker": np.array([[speaker]], np.int64), **arrays}

    def _check_text_input(self, where: str) -> None:
        if self._text_input != "on":
            raise InputError(
                where,
                "a server that reads raw text (its cmath_stream config says text_input: on)",
                f"text_input {self._text_input!r}",
            )

    def predict(self, conversations: Sequence[Any], embeddings: bool = False) -> list[Prediction]:
        """Whole conversations on model `cmath` (stateless: the balancer spreads the requests round robin).

        Each conversation: a mapping with 'speakers' and 'features' (or 'texts' instead of the text modality), or
        an object with those attributes (a RemoteConversation, a cmath_runtime Conversation). Requests hold at
        most the server's batch size of conversations of one kind (features or text), padded to their longest."""
        spec = self.spec
        if isinstance(conversations, (Mapping, str, bytes, np.ndarray)) or not hasattr(
            conversations, "__len__"
        ):
            raise InputError("conversations", "a list of conversations", type(conversations).__name__)
        rows = [self._conversation_arrays(i, c) for i, c in enumerate(conversations)]
        out: list[Prediction | None] = [None] * len(rows)
        kinds = {"text" in r for r in rows}
        for text in sorted(kinds):
            order = sorted(
                (i for i, r in enumerate(rows) if ("text" in r) == text),
                key=lambda i: len(rows[i]["speaker"]),
            )
            for k in range(0, len(order), spec.max_batch):
                chunk = order[k : k + spec.max_batch]
                arrays = _pad([rows[i] for i in chunk])
                result = self.call(
                    lambda: self.infer(CLASSIFY_MODEL, arrays),  # noqa: B023 (called right here)
                    f"{len(chunk)} conversation(s) on model {CLASSIFY_MODEL!r}",
                )
                probs, emb = result.as_numpy("probs"), result.as_numpy("embedding")
                for j, i in enumerate(chunk):
                    n = len(rows[i]["speaker"])
                    p = probs[j, :n]
                    out[i] = Prediction(
                        [spec.label_names[c] for c in p.argmax(-1)], p, emb[j, :n] if embeddings else None
                    )
        return [p for p in out if p is not None]

    def _conversation_arrays(self, i: int, conv: Any) -> dict[str, np.ndarray]:
        spec = self.spec
        where = f"conversations[{i}]"
        get = conv.get if isinstance(conv, Mapping) else lambda key: getattr(conv, key, None)
        speakers, features, texts = get("speakers"), get("features"), get("texts")
        if speakers is None:
            raise InputError(
                where,
                "a mapping with 'speakers' and 'features' (or an object with those attributes)",
                type(conv).__name__,
            )
        spk = check_speakers(speakers, spec, f"{where}.speakers")
        if texts is None or all(t is None for t in texts):
            return {**check_features(features, len(spk), spec, f"{where}.features"), "speaker": spk}
        self._check_text_input(f"{where}.texts")
        texts = list(texts)
        if len(texts) != len(spk) or not all(isinstance(t, str) for t in texts):
            raise InputError(
                f"{where}.texts",
                f"{len(spk)} strings (one per utterance)",
                f"{len(texts)} items of types {sorted({type(t).__name__ for t in texts})}",
            )
        rest = dataclasses.replace(spec, modalities=tuple(m for m in spec.modalities if m != TEXT_MODALITY))
        feats = {m: x for m, x in dict(features or {}).items() if m != TEXT_MODALITY}
        return {
            **check_features(feats, len(spk), rest, f"{where}.features"),
            "speaker": spk,
            "text": np.array([t.encode("utf-8") for t in texts], dtype=object),
        }


class RemoteConversation:
    """One conversation on the server: `add()` an utterance, get its emotion; survives replica failover.

    Thread-safe (one step at a time). `.probs()` / `.emotions()` are each utterance's answer when it was the
    newest; for a causal artifact that is the local Conversation's probs(); for a bidirectional one later
    utterances change earlier answers: `client.predict([conv])` reads the whole conversation again."""

    def __init__(self, client: ServeClient, sequence_id: int) -> None:
        self.client = client
        self.sequence_id = sequence_id
        self._sent: list[dict[str, np.ndarray]] = []  # every utterance's request arrays, to replay
        self._probs: list[np.ndarray] = []
        self._live = False  # whether the server holds this sequence, as far as we know
        self._lock = threading.Lock()
        self.replays = 0

    def __len__(self) -> int:
        return len(self._sent)

    def add(self, speaker: int, end: bool = False, **features: Any) -> Emotion:
        """Send one utterance (speaker id and t=/a=/v= feature vectors, or text= instead of t=); its Emotion.
        end=True: the server frees the conversation after this one (a later add() replays it first)."""
        with self._lock:
            arrays = self.client.utterance(len(self._sent), speaker, features)
            probs = self._send(arrays, end)
            self._sent.append(arrays)
            self._probs.append(probs)
            return self._emotion(probs)

    def _send(self, arrays: dict[str, np.ndarray], end: bool) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        options, stats = self.client.options, self.client.stats
        failures, last = 0, None
        started = time.monotonic()
        while failures < options.attempts:
            start = not self._live
            try:
                if start and self._sent:
                    self._replay()
                    start = False
                probs = self._step(arrays, start, end)
                self._live = not end
                return probs
            except InferenceServerException as e:
                kind = error_kind(e)
                if kind == "limit":
                    raise ConversationLimitError(e.message()) from None
                if kind == "request":
                    if start or end:  # the server kept nothing of a failed first or last step
                        self._live = False
                    raise RequestError(
                        f"utterances[{len(self._sent)}] (sequence {self.sequence_id}): {e.message()}"
                    ) from None
                self._live, last = False, e
                failures += 1
                if kind == "transport" and failures < options.attempts:
                    stats.count(retries=1)
                    time.sleep(min(options.backoff_s * 2 ** (failures - 1), options.max_backoff_s))
        raise UnreachableError(
            f"{self.client.url}: no answer for utterances[{len(self._sent)}] of sequence "
            f"{self.sequence_id} after {options.attempts} attempts in "
            f"{time.monotonic() - started:.1f} s (last error: {last}); is the server or "
            f"balancer running and reachable?"
        )

    def _replay(self) -> None:
        """Send the history again from sequence_start (answers equal the first time's; not returned)."""
        t0 = time.perf_counter()
        for i, past in enumerate(self._sent):
            self._step(past, i == 0, False)
        self.replays += 1
        self.client.stats.count(
            replays=1, replayed_utterances=len(self._sent), replay_seconds=time.perf_counter() - t0
        )

    def _step(self, arrays: dict[str, np.ndarray], start: bool, end: bool) -> np.ndarray:
        result = self.client.infer(
            STREAM_MODEL,
            arrays,
            sequence_id=self.sequence_id,
            sequence_start=start,
            sequence_end=end,
            headers={HEADER: str(self.sequence_id)},
        )
        return np.asarray(result.as_numpy("probs")[0], np.float32)

    def _emotion(self, probs: np.ndarray) -> Emotion:
        names = self.client.label_names
        return Emotion(names[int(probs.argmax())], np.asarray(probs, np.float32))

    @property
    def latest(self) -> Emotion:
        if not self._probs:
            raise InputError(
                "conversation", "at least one utterance (call add() first)", "an empty conversation"
            )
        return self._emotion(self._probs[-1])

    def probs(self) -> np.ndarray:
        """(n, num_classes): each utterance's probabilities as answered when it was added."""
        if not self._probs:
            return np.zeros((0, len(self.client.label_names)), np.float32)
        return np.stack(self._probs)

    def emotions(self) -> list[Emotion]:
        return [self._emotion(p) for p in self._probs]

    def labels(self) -> list[str]:
        return [e.label for e in self.emotions()]

    @property
    def speakers(self) -> np.ndarray:
        return np.array([int(a["speaker"][0, 0]) for a in self._sent], np.int64)

    @property
    def texts(self) -> list[str | None]:
        return [a["text"][0, 0].decode("utf-8") if "text" in a else None for a in self._sent]

    @property
    def features(self) -> dict[str, np.ndarray]:
        """{modality: (n, d_m)} of the utterances sent as features (the text modality: only if none was text)."""
        spec = self.client.spec
        return {
            m: np.concatenate([a[m] for a in self._sent])
            if self._sent
            else np.zeros((0, spec.feature_dims[m]), np.float32)
            for m in spec.modalities
            if all(m in a for a in self._sent)
        }


def _pad(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Conversations -> one (batch, longest) request, right-padded, with `mask`."""
    n = max(len(r["speaker"]) for r in rows)
    out: dict[str, np.ndarray] = {}
    for key, first in rows[0].items():
        shape = (len(rows), n, *first.shape[1:])
        arr = np.zeros(shape, first.dtype) if first.dtype != object else np.full(shape, b"", dtype=object)
        for b, r in enumerate(rows):
            arr[b, : len(r[key])] = r[key]
        out[key] = arr
    out["mask"] = np.arange(n)[None, :] < np.array([len(r["speaker"]) for r in rows])[:, None]
    return out


__all__ = ["ClientOptions", "ClientStats", "RemoteConversation", "ServeClient", "error_kind"]
