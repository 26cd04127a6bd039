"""`load()` an exported artifact into an EmotionModel and `predict()` emotions of whole conversations.

One EmotionModel may be shared by any number of threads: it holds only read-only state (the manifest and an
onnxruntime session, whose run() is thread-safe); every call keeps its data in local variables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import pad_conversations
from .errors import ArtifactError
from .files import sha256_file
from .manifest import Manifest, read_manifest
from .session import PRECISIONS, SessionInfo, create_session
from .text import resolve_texts
from .validation import CheckedConversation, check_conversations

DEFAULT_BATCH_SIZE = 16


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
    """An exported CMATH model on one onnxruntime session. Build it with `cmath_runtime.load()`."""

    def __init__(self, manifest: Manifest, info: SessionInfo, precision: str, load_seconds: float) -> None:
        self.manifest = manifest
        self.precision = precision
        self.load_seconds = load_seconds
        self._info = info

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
        return (f"EmotionModel({self.manifest.directory}, backend={self.backend!r}, precision={self.precision!r}, "
                f"modalities={list(self.modalities)}, labels={self.label_names})")

    def predict(self, conversations: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE,
                embeddings: bool = False) -> list[Prediction]:
        """Emotions of every utterance of every conversation, in input order.

        A conversation is a mapping (or object) with `speakers`: n integer ids and `features`: {modality: (n, d_m)
        array}; with a text encoder in the artifact, a mapping may give `texts` (n strings) instead of features["t"].
        Conversations of similar length are batched together (at most `batch_size` per onnxruntime call).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        checked = check_conversations(resolve_texts(self, conversations), self.manifest)
        results: list[Prediction | None] = [None] * len(checked)
        for group in length_groups([len(c) for c in checked], min(batch_size, self.manifest.max_batch)):
            probs, emb = self.run_padded([checked[i] for i in group])
            for row, i in enumerate(group):
                n = len(checked[i])
                p = probs[row, :n]
                results[i] = Prediction([self.manifest.label_names[k] for k in p.argmax(-1)], p,
                                        emb[row, :n] if embeddings else None)
        return results  # type: ignore[return-value]

    def run_padded(self, batch: Sequence[CheckedConversation]) -> tuple[np.ndarray, np.ndarray]:
        """One onnxruntime call on already validated conversations: (probs (B, N, C), embedding (B, N, d))."""
        feats, speaker, mask = pad_conversations([c.features for c in batch], [c.speakers for c in batch],
                                                 self.manifest.modalities)
        probs, emb = self._info.session.run(["probs", "embedding"], {**feats, "speaker": speaker, "mask": mask})
        return probs, emb


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, then chunked), so little is padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def artifact_key(backend: str, precision: str) -> str:
    """Which artifact of export.json a (backend, precision) runs. TensorRT builds fp16 from the fp32 ONNX;
    OpenVINO compiles model.onnx in f32 or bf16 (its INFERENCE_PRECISION_HINT, read back at load)."""
    if precision == "bf16" and backend != "openvino":
        raise ValueError("precision 'bf16' runs on backend='openvino' only (onnxruntime's CPU provider has no bf16 "
                         f"kernels for this graph), got backend={backend!r}")
    if backend == "openvino" and precision not in ("fp32", "bf16"):
        raise ValueError(f"backend 'openvino' runs precision 'fp32' or 'bf16', got {precision!r}")
    if precision == "int8" and backend not in ("auto", "cpu"):
        raise ValueError(f"precision 'int8' runs on onnxruntime's CPU provider (backend='cpu' or 'auto'), "
                         f"got backend={backend!r}")
    if backend in ("tensorrt", "openvino"):
        return "fp32"
    return precision


def check_agreement(manifest: Manifest, key: str) -> None:
    """Refuse an artifact whose recorded agreement with PyTorch failed (or was never recorded)."""
    record = (manifest.raw.get("parity") or {}).get(key)
    if not isinstance(record, dict) or record.get("passed") is not True:
        what = "has no agreement record" if not isinstance(record, dict) else (
            f"failed its agreement bound (argmax agreement {record.get('argmax_agreement')}, "
            f"needed {record.get('min_argmax_agreement')})")
        raise ArtifactError(manifest.path, f"the {key} artifact {what} in export.json; refusing to load it: "
                                           f"re-export with `cmath-export RUN_DIR --{key}`")


def load(path: str | Path, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
         verify: bool = True, cache_dir: str | Path | None = None, spinning: bool = False) -> EmotionModel:
    """Load an exported model: `path` is export.json, its folder, or a run directory with export/.

    backend: "auto" (CUDA if it really works here, else CPU, with a warning), "cpu", "cuda" or "tensorrt"
    (TensorRT EP with an engine cache in `cache_dir`, default <export>/trt_cache; fp16 when precision="fp16").
    An explicit backend that cannot run here raises BackendUnavailableError instead of falling back.
    precision: "fp32" (model.onnx), "fp16" (model.fp16.onnx; on the CPU provider this only rounds weights),
    "int8" (model.int8.onnx, int8 weights; refused unless its recorded agreement with PyTorch passed) or "bf16"
    (backend="openvino" only: model.onnx compiled with bf16 inference precision; never taken silently).
    backend "openvino" (optional extra `openvino`): model.onnx compiled by OpenVINO on the CPU in f32 (or bf16
    when asked); the precision and device it really runs are read back and checked at load.
    threads: intra-op threads of the CPU provider (None: onnxruntime's default, one per physical core).
    verify: check each file's sha256 against export.json before loading it.
    spinning: let idle onnxruntime threads spin (a little faster on an idle machine, much slower on a busy one).
    """
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    manifest = read_manifest(path)
    key = artifact_key(backend, precision)
    if key not in manifest.artifacts:
        raise ArtifactError(manifest.path, f"no {key} artifact listed (re-export with `cmath-export RUN_DIR --{key}`)")
    if key == "int8":
        check_agreement(manifest, key)
    artifact = manifest.artifacts[key]
    if not artifact.path.is_file():
        raise ArtifactError(artifact.path, f"the {key} model listed in {manifest.path.name} is missing")
    if verify:
        digest = sha256_file(artifact.path)
        if digest != artifact.sha256:
            raise ArtifactError(artifact.path, f"sha256 mismatch: export.json says {artifact.sha256[:16]}..., the file "
                                               f"has {digest[:16]}... (corrupt, truncated or replaced; re-export it)")
    info = create_session(artifact.path, manifest, backend, precision, threads,
                          Path(cache_dir) if cache_dir is not None else None, spinning)
    return EmotionModel(manifest, info, precision, time.perf_counter() - start)
