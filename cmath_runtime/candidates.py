"""The candidates the engine choice (cmath_runtime.engine_choice) times for an export's graphs, and how each opens.

`EngineRequest` is what load() was asked for; `model_candidates` / `encoder_candidates` turn it into the
engine x precision pairs of the model and of its text encoder, each with the bound its outputs must meet
against the reference (the first engine's fp32) and, where the export's records rule it out, why it is refused.
Every candidate opens through the same functions an explicit load uses (`open_model`, `open_text_encoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import CpuInfo, cpu_info
from .engine_choice import (
    AUTO,
    AUTO_PRECISIONS,
    CPU_ENGINES,
    EXACT,
    EXACT_PRECISIONS,
    Candidate,
    ChoiceKey,
    export_sha256,
    max_abs_check,
    min_cosine_check,
)
from .errors import ArtifactError
from .files import verified_file
from .manifest import Manifest, check_agreement
from .session import PRECISIONS, SessionInfo, check_combination, create_session
from .text import TextEncoder, TurnItem, open_text_encoder


@dataclass(frozen=True)
class EngineRequest:
    """What load() was asked for; the model's later parts (its text encoder, its step graph) follow it."""

    backend: str  # as asked: "auto", "cpu", "openvino", ...
    precision: str  # as asked: "fp32" (default), "auto", "int8", ...
    threads: int | None = None
    spinning: bool = False
    verify: bool = True
    choice_cache: Path | None = None  # the choice cache's folder (None: $CMATH_CACHE_DIR, ~/.cache/cmath)
    cpu: CpuInfo | None = None  # the machine (None: this one, cmath_runtime.cpu)

    @property
    def measured(self) -> bool:
        """Whether the engine is chosen by calibration (on a machine without a GPU, for "auto")."""
        return self.precision == AUTO or (self.backend == AUTO and self.precision == "fp32")

    @property
    def engines(self) -> tuple[str, ...]:
        return CPU_ENGINES if self.backend == AUTO else (self.backend,)

    @property
    def precisions(self) -> tuple[str, ...]:
        return AUTO_PRECISIONS if self.precision == AUTO else EXACT_PRECISIONS

    @property
    def machine(self) -> CpuInfo:
        return self.cpu if self.cpu is not None else cpu_info()

    def key(self, part: str, manifest: Manifest) -> ChoiceKey:
        return ChoiceKey(
            part,
            export_sha256(manifest.path),
            self.machine.key,
            self.threads,
            self.precisions,
            self.engines,
            self.spinning,
        )


def open_model(
    manifest: Manifest,
    request: EngineRequest,
    backend: str,
    precision: str,
    cache_dir: Path | None = None,
    static_shapes: int = 0,
) -> SessionInfo:
    """The model's graph for `precision` on `backend`: its artifact listed and sha256-checked, a reduced
    precision refused without a passed agreement record."""
    key = PRECISIONS[precision].artifact_key(backend)  # TensorRT builds its fp16 engine from model.onnx
    if key not in manifest.artifacts:
        raise ArtifactError(
            manifest.path, f"no {key} artifact listed (re-export with `cmath-export RUN_DIR --{key}`)"
        )
    if PRECISIONS[precision].needs_agreement:
        check_agreement(manifest.parity.get(key), manifest.path, f"{key} artifact", f"--{key}")
    artifact = manifest.artifacts[key]
    verified_file(artifact.path, artifact.sha256, f"{key} model", request.verify)
    return create_session(
        artifact.path,
        manifest,
        backend,
        precision,
        request.threads,
        cache_dir,
        request.spinning,
        static_shapes,
    )


CALIBRATION_UTTERANCES = 50  # the model is timed on one conversation this long (or max_len)
CALIBRATION_TEXTS = (  # the text encoder is timed on the last line read with its past turns, checked on all
    "Hey, how did the interview go?",
    "Honestly? I think it went really well.",
    "They kept asking about the project I did last summer, the one with the bridges...",
    "That's great! Did they say when they'd call you back?",
    "Next week, maybe. I'm trying not to get my hopes up.",
    "Oh come on, you're going to get it, I just know it!",
)


def model_call(manifest: Manifest) -> Callable[[SessionInfo], np.ndarray]:
    """Runs the calibration conversation (fixed seed, the same for every candidate) -> its probabilities."""
    n = min(CALIBRATION_UTTERANCES, manifest.max_len)
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {
        m: rng.standard_normal((1, n, d)).astype(np.float32) for m, d in manifest.feature_dims.items()
    }
    feeds["speaker"] = (np.arange(n) % min(2, manifest.num_speakers)).astype(np.int64)[None]
    feeds["mask"] = np.ones((1, n), bool)

    def call(info: SessionInfo) -> np.ndarray:
        return info.session.run(["probs"], feeds)[0]

    return call


def _calibration_items() -> list[TurnItem]:
    texts, speakers = list(CALIBRATION_TEXTS), [i % 2 for i in range(len(CALIBRATION_TEXTS))]
    return [(texts, speakers, i) for i in range(len(texts))]


def encode_one(encoder: TextEncoder) -> np.ndarray:
    return encoder.encode_turns(_calibration_items()[-1:])


def encode_all(encoder: TextEncoder) -> np.ndarray:
    return encoder.encode_turns(_calibration_items())


def _reduced_bound(record: Any, output: str) -> float | None:
    """A passed agreement record's bound on `output` ("probs"), None when it has none."""
    if not isinstance(record, dict) or record.get("passed") is not True:
        return None
    for o in record.get("outputs") or []:
        if isinstance(o, dict) and o.get("name") == output and isinstance(o.get("tolerance"), (int, float)):
            return float(o["tolerance"])
    return None


def model_candidates(manifest: Manifest, request: EngineRequest) -> list[Candidate]:
    """The model's candidates for `request` (engine_choice's doc): the first engine's fp32 is the reference; fp32
    elsewhere must be within EXACT of it, int8 within its parity record's bound, OpenVINO bf16 (no graph of its
    own) within the fp16 record's bound, on a CPU with bf16 arithmetic."""
    cpu = request.machine
    first = request.engines[0]

    def opener(backend: str, precision: str) -> Callable[[], SessionInfo]:
        return lambda: open_model(manifest, request, backend, precision)

    out = [Candidate(first, "fp32", opener(first, "fp32"), bound="the reference")]
    for backend in request.engines:
        for precision in request.precisions:
            if (backend, precision) == (first, "fp32"):
                continue
            try:
                check_combination(backend, precision)
            except ValueError:
                continue  # e.g. bf16 on onnxruntime
            refused, bound = "", None
            if precision == "fp32":
                bound = EXACT
            elif precision == "int8":
                bound = _reduced_bound(manifest.parity.get("int8"), "probs")
                if "int8" not in manifest.artifacts or bound is None:
                    refused = "no int8 model with a passed agreement record in export.json"
            else:  # bf16
                bound = _reduced_bound(manifest.parity.get("fp16"), "probs")
                if not cpu.bf16:
                    refused = f"this CPU has no bf16 arithmetic (ISA class {cpu.isa})"
                elif bound is None:
                    refused = "no passed fp16 agreement record in export.json to hold bf16 to"
            out.append(
                Candidate(
                    backend,
                    precision,
                    opener(backend, precision),
                    max_abs_check(bound if bound is not None else 0.0),
                    f"probs max |difference| <= {bound:g}" if bound is not None else "",
                    refused,
                )
            )
    return out


def encoder_candidates(manifest: Manifest, request: EngineRequest) -> list[Candidate]:
    """The text encoder's candidates: fp32 on every engine (embeddings within EXACT of the reference), its int8
    graph on every engine and OpenVINO bf16 of the fp32 graph (on a CPU with bf16 arithmetic), held to the min
    cosine of the export's int8 / fp16 records."""
    raw = manifest.text_encoder or {}
    files, variants = raw.get("files") or {}, raw.get("variants") or {}
    cpu = request.machine
    first = request.engines[0]

    def opener(backend: str, precision: str) -> Callable[[], TextEncoder]:
        return lambda: open_text_encoder(
            manifest, backend, precision, request.threads, request.verify, request.spinning
        )

    def cosine(record: Any) -> float | None:
        if not isinstance(record, dict) or record.get("passed") is not True:
            return None
        value = (record.get("bounds") or {}).get("min_cosine")
        return float(value) if isinstance(value, (int, float)) else None

    out = [Candidate(first, "fp32", opener(first, "fp32"), bound="the reference")]
    for backend in request.engines:
        for precision in request.precisions:
            if (backend, precision) == (first, "fp32") or (backend, precision) == ("cpu", "bf16"):
                continue
            if precision == "fp32":
                check, bound, refused = max_abs_check(EXACT), f"embedding max |difference| <= {EXACT:g}", ""
            else:
                twin = "int8" if precision == "int8" else "fp16"  # bf16 is held to the fp16 twin's bound
                low = cosine(variants.get(twin))
                check = min_cosine_check(low if low is not None else 1.0)
                bound = f"min cosine >= {low:g}" if low is not None else ""
                refused = ""
                if low is None or (precision == "int8" and f"onnx_{precision}" not in files):
                    refused = f"no {twin} text encoder with a passed agreement record in export.json"
                elif precision == "bf16" and not cpu.bf16:
                    refused = f"this CPU has no bf16 arithmetic (ISA class {cpu.isa})"
            out.append(Candidate(backend, precision, opener(backend, precision), check, bound, refused))
    return out
