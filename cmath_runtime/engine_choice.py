"""`backend="auto"` / `precision="auto"` on the CPU: the engine that fits this machine, measured once and cached.

A graph (the model, or its text encoder: each chosen on its own) has candidates, engine x precision: onnxruntime
fp32 (the reference) and OpenVINO f32 always; with precision="auto" also the reduced precisions the export
recorded as within their agreement bounds (onnxruntime int8, OpenVINO int8 for the encoder's int8 graph, OpenVINO
bf16 where the CPU has bf16 arithmetic). A candidate whose record is missing or failed is refused unopened.

Calibration, at the first load on a machine (bounded by BUDGET_SECONDS of timing per graph):
1. every candidate is opened as load() would open it (same threads, same thread-sleeping rule) and run once on
   the same fixed inputs; its outputs must agree with onnxruntime fp32's within its bound (fp32 engines: max
   |difference| <= 1e-4; reduced precisions: the bound of the export's record), else it is refused;
2. the survivors are timed on those inputs in interleaved rounds (each round calls every candidate once, in a
   rotating order), half the budget on the machine as it is ("quiet") and half beside a CPU-bound thread that
   takes one core ("shared"); each phase's median per candidate;
3. each candidate's score is the worse of its two ratios to onnxruntime fp32 (quiet/quiet, shared/shared), so an
   engine that is fast alone but collapses beside another job scores by its collapse; the lowest score wins,
   and only a score below MARGIN replaces onnxruntime fp32 (a tie within the noise keeps the reference).

The choice is cached in CACHE_FILE under the cache folder (`choice_cache=`, else $CMATH_CACHE_DIR, else
~/.cache/cmath), keyed by the graph, the export (sha256 of its export.json, which lists every file's sha256), the
CPU (model name + ISA flags, cmath_runtime.cpu), threads, the precision mode, the thread-sleeping rule and the
engines' versions; later loads read it. The file is written atomically; a corrupt one is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import CpuInfo
from .errors import ArtifactError, BackendUnavailableError, first_line
from .files import atomic_write_json, sha256_file

log = logging.getLogger("cmath_runtime")

AUTO = "auto"
CPU_ENGINES = ("cpu", "openvino")  # what backend="auto" chooses among on a machine without a GPU
EXACT_PRECISIONS = ("fp32",)  # precision="fp32" (the default): exact engines only
AUTO_PRECISIONS = ("fp32", "int8", "bf16")  # precision="auto": also the reduced precisions that passed
EXACT = 1e-4  # fp32 engines: max |difference| from onnxruntime fp32 on the calibration inputs
MARGIN = 0.95  # a candidate replaces onnxruntime fp32 only when its score (worse ratio) is below this
BUDGET_SECONDS = 1.0  # timing per graph, both phases together
MIN_ROUNDS, MAX_ROUNDS = 3, 200
CACHE_ENV = "CMATH_CACHE_DIR"
CACHE_FILE = "engine-choices.json"
FORMAT, VERSION = "cmath-engine-choices", 1
MAX_ENTRIES = 256  # the cache keeps the most recent choices
BUSY_ITERATIONS = 10_000  # PBKDF2 iterations per GIL-free stretch of the busy core (~10 ms)


@dataclass(frozen=True)
class Measured:
    """One candidate in a calibration: its medians, its agreement with onnxruntime fp32, or why it was refused."""

    backend: str
    precision: str
    bound: str  # what its outputs had to meet
    agreement: float | None = None  # max |difference| (fp32 bounds) or min cosine, vs onnxruntime fp32
    quiet_ms: float | None = None  # median call, the machine as it is
    shared_ms: float | None = None  # median call beside a CPU-bound thread
    score: float | None = None  # the worse of its two ratios to onnxruntime fp32
    refused: str = ""  # why it was not eligible ("" = eligible)

    @property
    def name(self) -> str:
        return engine_name(self.backend, self.precision)


@dataclass(frozen=True)
class EngineChoice:
    """What runs a graph and why (model.engine_choice["model"] / ["text_encoder"])."""

    part: str  # "model" | "text_encoder"
    backend: str
    precision: str
    source: str  # "calibrated" (measured now) | "cached" (measured by an earlier load) | "requested"
    reason: str
    cpu: str = ""
    isa: str = ""
    threads: int | None = None
    candidates: tuple[Measured, ...] = ()
    calibration_seconds: float = 0.0

    def summary(self) -> str:
        timed = ", ".join(
            f"{c.name} {c.quiet_ms:.2f}/{c.shared_ms:.2f} ms"
            for c in self.candidates
            if c.quiet_ms is not None
        )
        refused = "; ".join(f"{c.name}: {c.refused}" for c in self.candidates if c.refused)
        return (
            f"{self.part} on {engine_name(self.backend, self.precision)} ({self.source}; {self.reason}"
            + (f"; median quiet/shared: {timed}" if timed else "")
            + (f"; refused: {refused}" if refused else "")
            + (f"; CPU {self.cpu} ({self.isa}), threads {self.threads}" if self.cpu else "")
            + ")"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EngineChoice:
        fields = {**doc, "candidates": tuple(Measured(**c) for c in doc.get("candidates", ()))}
        return cls(**fields)


def engine_name(backend: str, precision: str) -> str:
    return f"{'onnxruntime' if backend == 'cpu' else backend} {precision}"


@dataclass
class Candidate:
    """One engine x precision for a graph: how to open it, how its outputs are held to onnxruntime fp32's."""

    backend: str
    precision: str
    open: Callable[[], Any]  # -> the opened engine (a SessionInfo, a TextEncoder)
    check: Callable[[np.ndarray, np.ndarray], tuple[float, bool]] | None = None  # (ref, got) -> (value, ok)
    bound: str = ""
    refused: str = ""  # refused before opening (no record, failed record, engine not installed, ...)


def max_abs_check(bound: float) -> Callable[[np.ndarray, np.ndarray], tuple[float, bool]]:
    def check(ref: np.ndarray, got: np.ndarray) -> tuple[float, bool]:
        err = float(np.abs(ref - got).max()) if np.isfinite(got).all() else float("inf")
        return err, err <= bound

    return check


def min_cosine_check(bound: float) -> Callable[[np.ndarray, np.ndarray], tuple[float, bool]]:
    def check(ref: np.ndarray, got: np.ndarray) -> tuple[float, bool]:
        if not np.isfinite(got).all():
            return float("-inf"), False
        a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        low = float(cos.min())
        return low, low >= bound

    return check


@dataclass(frozen=True)
class ChoiceKey:
    """What a cached choice is valid for."""

    part: str
    export_sha256: str
    cpu: str  # CpuInfo.key
    threads: int | None
    precisions: tuple[str, ...]
    engines: tuple[str, ...]
    spinning: bool
    versions: str = field(default_factory=lambda: engine_versions())

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def export_sha256(manifest_path: Path | None) -> str:
    """The export's identity: the sha256 of its export.json (which lists the sha256 of every file it names)."""
    return sha256_file(manifest_path) if manifest_path is not None else ""


def engine_versions() -> str:
    out = []
    for package in ("onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            out.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


def cache_folder(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "cmath"


class ChoiceCache:
    """CACHE_FILE in a folder: {key text: choice}. Unreadable or corrupt: ignored with a warning (and replaced on the
    next write); unwritable: a warning, the choice holds for this load only."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.file = cache_folder(folder) / CACHE_FILE
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        if not self.file.is_file():
            return {}
        try:
            doc = json.loads(self.file.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} document")
            entries = doc["choices"]
            if not isinstance(entries, dict):
                raise ValueError("'choices' is not an object")
            return entries
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            _warn(f"engine choice cache {self.file} is unreadable ({first_line(e)}); ignoring it")
            return {}

    def get(self, key: ChoiceKey) -> EngineChoice | None:
        with self._lock:
            entry = self._read().get(key.text())
        if entry is None:
            return None
        try:
            return EngineChoice.from_json(entry["choice"])
        except (KeyError, TypeError, ValueError) as e:
            _warn(f"engine choice cache {self.file}: a malformed entry ({first_line(e)}); measuring again")
            return None

    def put(self, key: ChoiceKey, choice: EngineChoice) -> None:
        with self._lock:
            entries = self._read()
            entries.pop(key.text(), None)
            entries[key.text()] = {"stored": time.time(), "choice": choice.to_json()}
            keep = dict(list(entries.items())[-MAX_ENTRIES:])  # insertion order: the oldest go first
            try:
                atomic_write_json(self.file, {"format": FORMAT, "version": VERSION, "choices": keep})
            except OSError as e:
                _warn(f"engine choice cache {self.file} cannot be written ({first_line(e)}); not cached")


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    log.warning(message)


def choose(
    part: str,
    key: ChoiceKey,
    cache: ChoiceCache,
    candidates: list[Candidate],
    call: Callable[[Any], np.ndarray],
    cpu: CpuInfo,
    threads: int | None,
    budget: float = BUDGET_SECONDS,
    probe: Callable[[Any], np.ndarray] | None = None,
) -> tuple[EngineChoice, Any]:
    """The engine for `part`: the cached choice for `key` when it is one of today's eligible candidates, else a
    calibration (module doc), stored in `cache`. `candidates[0]` is onnxruntime fp32, the reference; `call(engine)`
    runs the fixed calibration inputs through an opened engine and returns its output (the timed call), `probe`
    (default: `call`) the outputs held to the reference's. -> (choice, the chosen engine, opened)."""
    cached = cache.get(key)
    if cached is not None:
        match = [
            c
            for c in candidates
            if (c.backend, c.precision) == (cached.backend, cached.precision) and not c.refused
        ]
        if match:
            try:
                engine = match[0].open()
            except (ArtifactError, BackendUnavailableError) as e:
                _warn(
                    f"the cached engine for the {part} ({cached.summary()}) does not open ({first_line(e)})"
                )
            else:
                choice = EngineChoice(
                    **{**asdict(cached), "candidates": cached.candidates, "source": "cached"}
                )
                log.info("engine choice: %s", choice.summary())
                return choice, engine
    choice, engine = calibrate(part, candidates, call, cpu, threads, budget, probe)
    cache.put(key, choice)
    log.info("engine choice: %s", choice.summary())
    return choice, engine


def calibrate(
    part: str,
    candidates: list[Candidate],
    call: Callable[[Any], np.ndarray],
    cpu: CpuInfo,
    threads: int | None,
    budget: float = BUDGET_SECONDS,
    probe: Callable[[Any], np.ndarray] | None = None,
) -> tuple[EngineChoice, Any]:
    """Open, check and time the candidates (module doc); -> (the choice, the chosen engine)."""
    start = time.perf_counter()
    engines, results = _open_and_check(candidates, probe or call)
    timed = list(engines)
    medians: dict[str, dict[int, float]] = {}
    if len(timed) > 1:
        for engine in engines.values():  # warm-up: first calls allocate
            call(engine)
        for phase, busy in (("quiet", False), ("shared", True)):
            with _busy_core(busy):
                medians[phase] = _timed_rounds(timed, engines, call, budget / 2)
    best, reason = (0, "the only candidate that passed") if not medians else _fastest(medians, results)
    chosen = candidates[best]
    choice = EngineChoice(
        part,
        chosen.backend,
        chosen.precision,
        "calibrated",
        reason,
        cpu.model,
        cpu.isa,
        threads,
        tuple(results[i] for i in range(len(candidates))),
        time.perf_counter() - start,
    )
    return choice, engines[best]


def _open_and_check(
    candidates: list[Candidate], probe: Callable[[Any], np.ndarray]
) -> tuple[dict[int, Any], dict[int, Measured]]:
    """Open the reference (candidates[0]) and every other candidate that is not refused up front; keep those
    whose outputs on the calibration inputs are within their bound of the reference's. -> (the opened engines
    that passed, by index; every candidate's record, refusals with their reason)."""
    reference = candidates[0]
    engines: dict[int, Any] = {0: reference.open()}
    ref_out = probe(engines[0])
    results: dict[int, Measured] = {0: Measured(reference.backend, reference.precision, "the reference", 0.0)}
    for i, c in enumerate(candidates[1:], 1):
        refused, value = c.refused, None
        if not refused:
            try:
                engine = c.open()
                assert c.check is not None
                value, ok = c.check(ref_out, probe(engine))
                if ok:
                    engines[i] = engine
                else:
                    refused = f"outside its bound on the calibration inputs ({value:.3g}; {c.bound})"
            except (ArtifactError, BackendUnavailableError) as e:
                refused = first_line(e)
        results[i] = Measured(c.backend, c.precision, c.bound, value, refused=refused)
    return engines, results


def _fastest(medians: dict[str, dict[int, float]], results: dict[int, Measured]) -> tuple[int, str]:
    """The timed candidate with the best worst-case ratio to the reference (quiet and shared), if it beats it by
    the margin, else the reference; and why. Each timed candidate's record gets its times and score."""
    timed = list(medians["quiet"])
    scores = {
        i: max(medians["quiet"][i] / medians["quiet"][0], medians["shared"][i] / medians["shared"][0])
        for i in timed
    }
    for i in timed:
        results[i] = replace(
            results[i],
            quiet_ms=1e3 * medians["quiet"][i],
            shared_ms=1e3 * medians["shared"][i],
            score=scores[i],
        )
    winner = min(timed, key=lambda i: scores[i])
    if winner != 0 and scores[winner] < MARGIN:
        return (
            winner,
            f"fastest: {scores[winner]:.2f}x onnxruntime fp32's time at worst (quiet and beside a busy core)",
        )
    return 0, f"no candidate beat onnxruntime fp32 by {100 * (1 - MARGIN):.0f}% both quiet and shared"


def _timed_rounds(
    order: list[int], engines: dict[int, Any], call: Callable[[Any], Any], seconds: float
) -> dict[int, float]:
    """Median seconds per call of each engine: rounds of one call each, the order rotated every round, until
    `seconds` have passed (at least MIN_ROUNDS rounds, at most MAX_ROUNDS)."""
    times: dict[int, list[float]] = {i: [] for i in order}
    deadline = time.perf_counter() + seconds
    for r in range(MAX_ROUNDS):
        if r >= MIN_ROUNDS and time.perf_counter() > deadline:
            break
        for k in range(len(order)):
            i = order[(r + k) % len(order)]
            t = time.perf_counter()
            call(engines[i])
            times[i].append(time.perf_counter() - t)
    return {i: statistics.median(v) for i, v in times.items()}


@contextmanager
def _busy_core(busy: bool) -> Iterator[None]:
    """While inside (when `busy`): a thread that keeps one core busy, like another process would: PBKDF2 rounds of
    ~10 ms each, during which hashlib lets go of the GIL, so it computes beside the engines' threads and holds the
    GIL only for the loop's few bytecodes."""
    if not busy:
        yield
        return
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            hashlib.pbkdf2_hmac("sha256", b"cmath", b"calibration", BUSY_ITERATIONS)

    thread = threading.Thread(target=burn, name="cmath-calibration-busy-core", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
