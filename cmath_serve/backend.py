"""The model code Triton's Python backend runs (inside its stub process), for `cmath` and `cmath_stream`.

Each `execute` gets the requests Triton batched together. Every request is checked on its own: a bad one gets
an error response carrying the runtime's message (field, expected, actual) and the others are still computed.
Only the runtime's public API is used: `load`, `EmotionModel.predict`, `Conversation`.

nvidia-pytriton's stub is built against numpy 1.x (the wheel pins numpy<2). Under numpy 2 its
`Tensor.as_numpy()` / `Tensor(name, ndarray)` read the dtype's item size as 0 (measured: an FP32 input
[1, 2, 3] came back as [1, 1, 1], outputs came back empty, and any BYTES input crashed the stub before the model
code ran), so under numpy 2 tensors cross through DLPack instead; under numpy 1 the stub's own path is used
(there, handing it DLPack outputs crashed the stub). BYTES tensors work under numpy 1 only: the optional raw `text`
input (artifacts with a text encoder) is declared only then (repository.text_input says why not). There is no
`label` output: the class order is the config parameter `label_names`.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import numpy as np

from cmath_runtime import Prediction
from cmath_runtime.errors import CmathError, InputError

from .conversations import ConversationStore, step_conversations
from .errors import ConversationLimitError

LOG = logging.getLogger("cmath_serve")
NUMPY2 = int(np.__version__.split(".")[0]) >= 2
ROWS_NOTE = (
    "(conversations[i] is batch row i of the request; features[m] is input m, speakers is input 'speaker')"
)


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # only importable inside Triton's Python-backend stub

    return pb_utils


class _Base:
    def __init__(self, args: dict[str, Any]) -> None:
        import cmath_runtime

        config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(self.params.get("threads", "0")) or None
        self.model = cmath_runtime.load(
            self.params["export_dir"],
            backend=self.params.get("backend", "auto"),
            precision=self.params.get("precision", "fp32"),
            threads=threads,
        )
        self.manifest = self.model.manifest
        self.max_batch = int(self.params.get("max_batch", "64"))
        self.pb = _pb()
        if NUMPY2:
            _quiet_dlpack_capsules()

    def _error(self, error: Exception) -> Any:
        pb = self.pb
        code = (
            pb.TritonError.UNAVAILABLE
            if isinstance(error, ConversationLimitError)
            else pb.TritonError.INVALID_ARG
        )
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(error), code))

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        """A request tensor as an owned numpy array (DLPack under numpy 2, see the module docstring)."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        return np.array(np.from_dlpack(tensor) if NUMPY2 else tensor.as_numpy(), copy=True)

    def _required(self, request: Any, name: str) -> np.ndarray:
        """A tensor the model's config requires (Triton refuses requests without it before they reach us)."""
        tensor = self._input(request, name)
        if tensor is None:
            raise InputError(name, f"input {name!r}", "none")
        return tensor

    def _texts(self, request: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        """The optional `text` input (UTF-8 BYTES) as an object array of str, or None when the request has none."""
        raw = self._input(request, "text")
        if raw is None:
            return None
        if raw.shape != shape:
            raise InputError(
                "text", f"one string per utterance: shape {shape} like input 'speaker'", f"shape {raw.shape}"
            )
        out = np.empty(raw.shape, object)
        for idx, value in np.ndenumerate(raw):
            try:
                out[idx] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError as e:
                raise InputError(
                    f"text{list(idx)}", "UTF-8 text", f"invalid bytes ({e.reason} at {e.start})"
                ) from None
        return out

    def _features(self, request: Any, text: bool) -> dict[str, np.ndarray]:
        """The feature inputs the request has; with raw text, `t` is replaced by `text` (never both)."""
        feats = {m: self._input(request, m) for m in self.manifest.modalities}
        if text and feats.get("t") is not None:
            raise InputError("text", "either input 't' (features) or 'text' (raw text), not both", "both")
        for m, x in feats.items():
            if x is None and not (text and m == "t"):
                hint = " or 'text' (raw text)" if self.params.get("text_input") == "on" and m == "t" else ""
                raise InputError(m, f"input {m!r} (features){hint}", "neither")
        return {m: x for m, x in feats.items() if x is not None}

    def _output(self, name: str, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        return self.pb.Tensor.from_dlpack(name, array) if NUMPY2 else self.pb.Tensor(name, array)

    def finalize(self) -> None:
        del self.model


class ClassifyModel(_Base):
    """`cmath`: (batch, utterances) conversations in, probs/embedding out; one runtime call per execute when every
    request is valid (the runtime batches conversations of similar length)."""

    def execute(self, requests: list[Any]) -> list[Any]:
        results: dict[int, list[Prediction] | CmathError] = {}
        good: dict[int, list[dict[str, Any]]] = {}
        for i, request in enumerate(requests):
            try:
                good[i] = self._conversations(request)
            except CmathError as e:
                results[i] = e
        try:
            flat = [c for convs in good.values() for c in convs]
            preds = self.model.predict(flat, batch_size=self.max_batch, embeddings=True) if flat else []
            k = 0
            for i, convs in good.items():
                results[i] = preds[k : k + len(convs)]
                k += len(convs)
        except CmathError:  # some request is bad in a way only the runtime sees: each request on its own
            for i, convs in good.items():
                try:
                    results[i] = self.model.predict(convs, batch_size=self.max_batch, embeddings=True)
                except CmathError as e:
                    results[i] = CmathError(f"{e} {ROWS_NOTE}")
        responses = []
        for i, request in enumerate(requests):
            outcome = results[i]
            if isinstance(outcome, Exception):
                responses.append(self._error(outcome))
                continue
            shape = self._required(request, "speaker").shape
            probs = np.zeros((*shape, self.manifest.num_classes), np.float32)
            emb = np.zeros((*shape, self.manifest.d), np.float32)
            for b, pred in enumerate(outcome):
                probs[b, : len(pred)] = pred.probs
                emb[b, : len(pred)] = pred.embedding
            responses.append(
                self.pb.InferenceResponse([self._output("probs", probs), self._output("embedding", emb)])
            )
        return responses

    def _conversations(self, request: Any) -> list[dict[str, Any]]:
        """The request's rows as runtime conversations (right-padded rows cut at the end of their mask)."""
        speaker, mask = self._required(request, "speaker"), self._required(request, "mask")
        b, n = speaker.shape
        texts = self._texts(request, (b, n))
        feats = self._features(request, texts is not None)
        for name, x in [("mask", mask), *feats.items()]:
            if x.shape[:2] != (b, n):
                raise InputError(
                    name, f"(batch, utterances) = {(b, n)} like input 'speaker'", f"shape {x.shape}"
                )
        out = []
        for row in range(b):
            k = int(mask[row].sum())
            if k == 0:
                raise InputError(f"mask[{row}]", "at least one True (a real utterance)", "all False")
            if not mask[row, :k].all():
                raise InputError(
                    f"mask[{row}]",
                    "True for the real utterances, then False (right-padded)",
                    mask[row].astype(int).tolist(),
                )
            conv = {"speakers": speaker[row, :k], "features": {m: x[row, :k] for m, x in feats.items()}}
            if texts is not None:
                conv["texts"] = list(texts[row, :k])
            out.append(conv)
        return out


class StreamModel(_Base):
    """`cmath_stream`: one utterance per request of a Triton sequence; the conversations live here."""

    def __init__(self, args: dict[str, Any]) -> None:
        super().__init__(args)
        import cmath_runtime

        self.path = self.params.get("stream_path", "recompute")
        self.mode = "recompute" if self.path == "recompute" else self.params.get("stream_mode", "batched")
        self.store = ConversationStore(
            lambda: cmath_runtime.Conversation(self.model),
            int(self.params.get("max_conversations", "1024")),
            float(self.params.get("idle_timeout_s", "600")),
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        todo: list[tuple[int, int, bool, bool, Any, dict[str, Any]]] = []
        seen: set[int] = set()
        for i, request in enumerate(requests):
            seq_id, start, end = self._controls(request)
            try:
                if (
                    seq_id in seen
                ):  # Triton never puts two requests of one sequence in one batch; be safe anyway
                    raise InputError("sequence_id", "one request per sequence at a time", f"two for {seq_id}")
                utterance = self._utterance(request)
                conv = self.store.start(seq_id) if start else self.store.get(seq_id)
                seen.add(seq_id)
                todo.append((i, seq_id, start, end, conv, utterance))
            except CmathError as e:
                if end:
                    self.store.end(seq_id, "was ended by its last request (sequence_end), which failed")
                responses[i] = self._error(e)
        outcomes = step_conversations(
            self.model, [t[4] for t in todo], [t[5] for t in todo], self.mode, self.max_batch
        )
        for (i, seq_id, start, end, _, _), outcome in zip(todo, outcomes):
            if isinstance(outcome, Exception):
                responses[i] = self._error(outcome)
                if start:  # a conversation whose first utterance failed holds nothing: do not keep it
                    self.store.end(seq_id, "failed on its first request")
            else:
                responses[i] = self.pb.InferenceResponse([self._output("probs", outcome.reshape(1, -1))])
            if end:
                self.store.end(seq_id)
        return responses

    def _controls(self, request: Any) -> tuple[int, bool, bool]:
        def flag(name: str) -> bool:
            x = self._input(request, name)
            return bool(x is not None and x.reshape(-1)[0])

        corrid = self._input(request, "CORRID")
        seq_id = int(corrid.reshape(-1)[0]) if corrid is not None else int(request.correlation_id())
        return seq_id, flag("START"), flag("END")

    def _utterance(self, request: Any) -> dict[str, Any]:
        speaker = self._required(request, "speaker")
        if speaker.shape != (1, 1):
            raise InputError("speaker", "one utterance per request: shape (1, 1)", f"shape {speaker.shape}")
        utt: dict[str, Any] = {"speaker": int(speaker[0, 0])}
        texts = self._texts(request, (1, 1))
        if texts is not None:
            utt["text"] = texts[0, 0]
        for m, x in self._features(request, texts is not None).items():
            if x.shape[0] != 1:
                raise InputError(
                    m,
                    f"one utterance per request: shape (1, {self.manifest.feature_dims[m]})",
                    f"shape {x.shape}",
                )
            utt[m] = x[0]
        return utt

    def finalize(self) -> None:
        LOG.info("cmath_stream: %s", self.store.stats())
        super().finalize()


def _quiet_dlpack_capsules() -> None:
    """The stub renames the DLPack capsules it takes to "used_dlpack" while numpy's deleter looks for
    "used_dltensor": each output tensor then logs a harmless ValueError as "unraisable". Drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "cmath_serve", False):
        return

    def hook(info: Any) -> None:
        if isinstance(info.exc_value, ValueError) and "PyCapsule_GetPointer" in str(info.exc_value):
            return
        previous(info)

    hook.cmath_serve = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
