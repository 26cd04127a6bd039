"""`load()` an exported artifact into an EmotionModel and `predict()` emotions of whole conversations.

One EmotionModel may be shared by any number of threads: it holds only read-only state (the manifest and an
onnxruntime session, whose run() is thread-safe); every call keeps its data in local variables.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import pad_conversations
from .candidates import (
    EngineRequest,
    encode_all,
    encode_one,
    encoder_candidates,
    model_call,
    model_candidates,
    open_model,
)
from .cpu import CpuInfo
from .engine_choice import AUTO, CPU_ENGINES, ChoiceCache, EngineChoice, choose
from .errors import InputError
from .files import verified_file
from .manifest import Manifest, check_agreement, read_manifest
from .session import SessionInfo, check_combination, open_session
from .streaming import StepGraph
from .text import TEXT_MODALITY, TextEncoder, TextEncoderSpec, open_text_encoder, resolve_texts
from .validation import CheckedConversation, check_conversations, nonfinite_output_error, nonfinite_rows

DEFAULT_BATCH_SIZE = 16
OPENVINO_STATIC_SHAPES = (
    2  # load(backend="openvino")'s default static_shapes: ~100 MB each for the meld model
)


@dataclass(frozen=True)
class Prediction:
    """Emotions of every utterance of one conversation, in utterance order."""

    labels: list[str]  # per utterance: the most probable label name
    probs: np.ndarray  # (n, num_classes) float32, rows sum to 1; columns follow label_names
    embedding: np.ndarray | None = None  # (n, d) fused utterance embeddings, when asked for

    @property
    def label_ids(self) -> np.ndarray:
        return self.probs.argmax(axis=-1)

    def __len__(self) -> int:
        return len(self.labels)


class EmotionModel:
    """An exported CMATH model on one engine session. Build it with `cmath_runtime.load()`.

    The model owns every graph of its artifact: the model itself (loaded now), and, loaded on first use, its
    text encoder (`text_encoder`, for raw text) and its step graph (`step_graph`, for Conversation's step path).
    `engine_choice` says what runs each loaded graph and why.
    """

    def __init__(
        self,
        manifest: Manifest,
        info: SessionInfo,
        precision: str,
        load_seconds: float,
        verify: bool = True,
        request: EngineRequest | None = None,
        choice: EngineChoice | None = None,
    ) -> None:
        self.manifest = manifest
        self.precision = precision
        self.load_seconds = load_seconds
        self.verify = verify
        self._info = info
        self._request = request or EngineRequest(info.backend, precision, info.threads, info.spinning, verify)
        self._choices = {
            "model": choice
            or EngineChoice("model", info.backend, precision, "requested", "load() was asked for it")
        }
        self._parts_lock = threading.Lock()
        self._text_encoder: TextEncoder | None = None
        self._step_graph: StepGraph | None = None
        self._step_loaded = False

    @property
    def engine_choice(self) -> dict[str, EngineChoice]:
        """What runs each graph loaded so far ("model"; "text_encoder" once raw text was encoded) and why: for
        backend="auto" / precision="auto", the calibration's medians of every candidate, or that it was cached."""
        return dict(self._choices)

    @property
    def text_encoder(self) -> TextEncoder:
        """The artifact's text encoder (loaded once, sha256-checked); InputError if the artifact has none."""
        if self._text_encoder is None:
            with self._parts_lock:
                if self._text_encoder is None:
                    self._text_encoder = self._open_text_encoder()
        return self._text_encoder

    @property
    def step_graph(self) -> StepGraph | None:
        """The artifact's step graph (causal models; loaded once), None when it has none."""
        if not self._step_loaded:
            with self._parts_lock:
                if not self._step_loaded:
                    self._step_graph = self._open_step_graph()
                    self._step_loaded = True
        return self._step_graph

    def _open_text_encoder(self) -> TextEncoder:
        """The text encoder: chosen by calibration like the model (backend or precision "auto", on the CPU), else on
        the model's engine (a GPU model's encoder on onnxruntime's CPU) in the model's precision when the export made
        that twin (fp16, int8), else fp32."""
        if TextEncoderSpec.from_manifest(self.manifest) is None or TEXT_MODALITY not in self.modalities:
            raise InputError(
                "text",
                "feature vectors: this artifact has no text encoder",
                "raw text",
                "Re-export the run with cmath-export (without --no-text-encoder).",
            )
        req = self._request
        if req.measured and self.backend in CPU_ENGINES:
            choice, encoder = choose(
                "text_encoder",
                req.key("text_encoder", self.manifest),
                ChoiceCache(req.choice_cache),
                encoder_candidates(self.manifest, req),
                encode_one,
                req.machine,
                req.threads,
                probe=encode_all,
            )
        else:
            backend = self.backend if self.backend in CPU_ENGINES else "cpu"
            encoder = open_text_encoder(
                self.manifest, backend, self.precision, req.threads, self.verify, req.spinning
            )
            choice = EngineChoice(
                "text_encoder", backend, encoder.label, "requested", "the model's engine and precision"
            )
        self._choices["text_encoder"] = choice
        return encoder

    def _open_step_graph(self) -> StepGraph | None:
        """The step graph on the model's engine: CPU stays CPU, OpenVINO stays OpenVINO (same precision), a
        GPU model steps on CUDA (the step graph's growing cache axis has no TensorRT profile); int8 models run
        the int8 step graph, refused without a passed agreement record."""
        entry = self.manifest.step
        if not entry:
            return None
        file = entry
        if self.precision == "int8":
            file = entry.get("int8") or {}
            check_agreement(file.get("parity"), self.manifest.path, "int8 step graph", "--int8")
        path = verified_file(
            self.manifest.file(file["file"], "step.file"), file["sha256"], "step graph", self.verify
        )
        backend = self.backend if self.backend in ("cpu", "openvino") else "cuda"
        precision = self.precision if backend == "openvino" else "fp32"
        names = [i["name"] for i in entry.get("inputs", [])] or None
        session = open_session(
            path,
            backend,
            precision=precision,
            threads=self.threads,
            inputs=names,
            spinning=self.spinning,
            what="step graph",
        ).session
        return StepGraph(session, {**entry, "sha256": file["sha256"]}, path)

    @property
    def backend(self) -> str:
        """What actually runs the model: "cpu", "cuda" or "tensorrt" (read back from onnxruntime)."""
        return self._info.backend

    @property
    def providers(self) -> tuple[str, ...]:
        """onnxruntime's providers of the session, in priority order (session.get_providers())."""
        return self._info.providers

    @property
    def note(self) -> str:
        """Fallbacks and caveats of this load ("" when none)."""
        return self._info.note

    @property
    def threads(self) -> int | None:
        return self._info.threads

    @property
    def spinning(self) -> bool:
        """Whether idle onnxruntime threads spin (load(spinning=True)); the step graph and text encoder follow it."""
        return self._info.spinning

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.label_names)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.manifest.modalities

    @property
    def feature_dims(self) -> dict[str, int]:
        return dict(self.manifest.feature_dims)

    @property
    def num_speakers(self) -> int:
        return self.manifest.num_speakers

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    def __repr__(self) -> str:
        return (
            f"EmotionModel({self.manifest.directory}, backend={self.backend!r}, precision={self.precision!r}, "
            f"modalities={list(self.modalities)}, labels={self.label_names})"
        )

    def predict(
        self, conversations: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE, embeddings: bool = False
    ) -> list[Prediction]:
        """Emotions of every utterance of every conversation, in input order.

        A conversation is a mapping (or object) with `speakers`: n integer ids and `features`: {modality: (n, d_m)
        array}; with a text encoder in the artifact, a mapping may give `texts` (n strings) instead of features["t"].
        Conversations of similar length are batched together (at most `batch_size` per onnxruntime call).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError("batch_size", "a positive integer", repr(batch_size))
        checked = check_conversations(resolve_texts(conversations, lambda: self.text_encoder), self.manifest)
        results: list[Prediction | None] = [None] * len(checked)
        for group in length_groups([len(c) for c in checked], min(batch_size, self.manifest.max_batch)):
            probs, emb = self.run_padded([checked[i] for i in group])
            for row, i in enumerate(group):
                n = len(checked[i])
                p = probs[row, :n]
                bad = nonfinite_rows(p, emb[row, :n])
                if len(bad):  # never hand back a non-finite probability
                    raise nonfinite_output_error(
                        f"conversations[{i}].features", bad, checked[i].features, self.precision
                    )
                results[i] = Prediction(
                    [self.manifest.label_names[k] for k in p.argmax(-1)],
                    p,
                    emb[row, :n] if embeddings else None,
                )
        return results  # type: ignore[return-value]

    def run_padded(self, batch: Sequence[CheckedConversation]) -> tuple[np.ndarray, np.ndarray]:
        """One onnxruntime call on already validated conversations: (probs (B, N, C), embedding (B, N, d))."""
        feats, speaker, mask = pad_conversations(
            [c.features for c in batch], [c.speakers for c in batch], self.manifest.modalities
        )
        probs, emb = self._info.session.run(
            ["probs", "embedding"], {**feats, "speaker": speaker, "mask": mask}
        )
        return probs, emb


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, then chunked), so little is padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def load(
    path: str | Path,
    backend: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    verify: bool = True,
    cache_dir: str | Path | None = None,
    spinning: bool = False,
    static_shapes: int | None = None,
    choice_cache: str | Path | None = None,
    cpu: CpuInfo | None = None,
) -> EmotionModel:
    """Load an exported model: `path` is export.json, its folder, or a run directory with export/.

    backend: "auto", "cpu" (onnxruntime), "openvino", "cuda" or "tensorrt". "auto" is CUDA where a GPU provider
    is installed (falling back to the CPU with a warning when it cannot start), else the fastest CPU engine for
    this machine and export: onnxruntime and OpenVINO (when installed) are timed once, quiet and beside a busy
    core, and the choice is cached (cmath_runtime.engine_choice; `model.engine_choice` says what and why).
    An explicit backend that cannot run here raises BackendUnavailableError instead of falling back.
    precision: "fp32" (default: model.onnx, or OpenVINO f32; with backend="auto" only exact engines, within 1e-4
    of onnxruntime fp32), "auto" (on the CPU: also the reduced precisions below whose agreement records pass, the
    fastest chosen as for backend="auto"), "fp16" (model.fp16.onnx; on the CPU provider this only rounds
    weights), "int8" (model.int8.onnx, int8 weights, onnxruntime CPU; refused unless its recorded agreement with
    PyTorch passed) or "bf16" (backend="openvino" only: model.onnx compiled with bf16 inference precision).
    The text encoder (raw text) is chosen the same way on its first use, on its own.
    threads: intra-op threads of the CPU engines (None: the engine's default, one per physical core).
    verify: check each file's sha256 against export.json before loading it.
    cache_dir: TensorRT's engine cache (default <export>/trt_cache).
    spinning: let idle onnxruntime threads spin (a little faster on an idle machine, much slower on a busy one).
    static_shapes: backend "openvino" only (default 2): the second call with a (batch, utterances) shape among the
    last 64 compiles model.onnx for that exact shape (once; later calls of that shape run faster); at most
    `static_shapes` are kept (each a copy of the weights), the busiest of the recent calls; 0 = one dynamic
    model. Shapes seen once, such as a conversation recomputed as it grows, never compile.
    choice_cache: the folder of the engine choice cache (default $CMATH_CACHE_DIR, else ~/.cache/cmath).
    cpu: the machine the choice is cached for (default: this one, read from the OS).
    """
    start = time.perf_counter()
    _check_backend_precision(backend, precision)
    manifest = read_manifest(path)
    request = EngineRequest(
        backend, precision, threads, spinning, verify, Path(choice_cache) if choice_cache else None, cpu
    )
    if request.measured and not (backend == AUTO and _gpu_listed()):
        choice, info = _calibrated(manifest, request, static_shapes)
    else:
        choice, info = _requested(
            manifest, request, Path(cache_dir) if cache_dir is not None else None, static_shapes
        )
    return EmotionModel(
        manifest, info, choice.precision, time.perf_counter() - start, verify, request, choice
    )


def _check_backend_precision(backend: str, precision: str) -> None:
    if precision == AUTO:
        if backend not in (AUTO, *CPU_ENGINES):
            raise ValueError(
                f"precision 'auto' chooses among the CPU engines (backend 'auto', 'cpu' or 'openvino'), got "
                f"backend={backend!r}"
            )
    else:
        check_combination(backend, precision)


def _calibrated(
    manifest: Manifest, request: EngineRequest, static_shapes: int | None
) -> tuple[EngineChoice, SessionInfo]:
    """The fastest CPU engine (and precision) for this machine and export, timed once and cached."""
    choice, info = choose(
        "model",
        request.key("model", manifest),
        ChoiceCache(request.choice_cache),
        model_candidates(manifest, request),
        model_call(manifest),
        request.machine,
        request.threads,
    )
    shapes = OPENVINO_STATIC_SHAPES if static_shapes is None else static_shapes
    if choice.backend == "openvino" and shapes:  # calibrated on the dynamic model
        info = open_model(manifest, request, choice.backend, choice.precision, None, shapes)
    return choice, info


def _requested(
    manifest: Manifest, request: EngineRequest, cache_dir: Path | None, static_shapes: int | None
) -> tuple[EngineChoice, SessionInfo]:
    """The engine and precision load() was asked for (backend "auto" with a GPU provider listed: the GPU first)."""
    if static_shapes is None:
        static_shapes = OPENVINO_STATIC_SHAPES if request.backend == "openvino" else 0
    precision = "fp32" if request.precision == AUTO else request.precision
    info = open_model(manifest, request, request.backend, precision, cache_dir, static_shapes)
    return EngineChoice("model", info.backend, precision, "requested", "load() was asked for it"), info


def _gpu_listed() -> bool:
    """Whether this onnxruntime lists a GPU provider that backend="auto" tries first."""
    from . import session  # read at call time: what onnxruntime lists may change (tests replace it)

    listed = session.available_providers()
    return any(b.provider in listed for b in session.auto_order() if b.name not in CPU_ENGINES)
