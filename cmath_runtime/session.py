"""The one onnxruntime session loader (fastembed/rembg style): every session cmath creates comes from `open_session`.

The exported model, the step graph, the text encoder and the exporter's parity checks all open their graphs here:
the requested backend's provider must be listed by this onnxruntime, the session is created, and the provider that
really runs it is read back from `session.get_providers()`. onnxruntime-gpu lists CUDA and TensorRT even on
machines without a GPU and then silently runs on the CPU, so an explicit backend that did not come up is a
BackendUnavailableError; "auto" falls back and says so (a warning and `SessionInfo.note`).

Backends and precisions are tables, not if-chains: a new execution provider (e.g. OpenVINO) is one
`register_backend(Backend(...))`, a new precision (e.g. int8) one `register_precision(Precision(...))`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, BackendUnavailableError, first_line

if TYPE_CHECKING:
    from .manifest import Manifest


@dataclass(frozen=True)
class SessionRequest:
    """What a backend may need to build its provider options (TensorRT: the manifest's shapes and a cache)."""

    model_file: Path
    precision: str = "fp32"
    manifest: Manifest | None = None
    cache_dir: Path | None = None
    static_shapes: int = 0  # OpenVINO: shapes compiled for themselves (openvino_backend.py); 0 = dynamic only


@dataclass(frozen=True)
class Backend:
    """One execution backend: the onnxruntime provider that runs it and how to ask for it."""

    name: str  # what users pass: load(backend=name)
    provider: str  # onnxruntime provider name
    install: str  # how to get the provider, for the error message
    auto_rank: int | None = None  # "auto" tries backends by rank (lowest first); None = opt-in only
    fallbacks: tuple[str, ...] = ("CPUExecutionProvider",)  # providers listed after it
    options: Callable[[SessionRequest], dict[str, Any]] | None = None  # provider options (None: defaults)
    prepare: Callable[[dict[str, Any]], None] | None = None  # side effects before creation (make a cache dir)
    # An engine other than onnxruntime (OpenVINO): opens its own session-like object (run, get_inputs,
    # get_outputs, get_providers) and checks what really runs; -> (session, note). None: onnxruntime.
    opener: Callable[[SessionRequest, int | None], tuple[Any, str]] | None = None
    precisions: tuple[str, ...] | None = None  # the precisions it runs (None: all)

    def providers(self, request: SessionRequest) -> list[Any]:
        """onnxruntime's provider list, this backend first (with its options), CPU always last."""
        first = (self.provider, self.options(request)) if self.options else self.provider
        return [first, *(p for p in self.fallbacks if p != self.provider)]


@dataclass(frozen=True)
class Precision:
    """One numeric precision: which manifest artifact it loads, per backend."""

    name: str
    artifact: str  # export.json "artifacts" key it loads by default
    artifact_for: dict[str, str] = field(default_factory=dict)  # backend -> artifact key, where it differs
    cpu_note: str = ""  # caveat when the CPU provider runs it
    backends: tuple[str, ...] | None = (
        None  # the backends that run it ("auto" included where it may); None: all
    )
    needs_agreement: bool = False  # load only with a passed agreement record in export.json (int8)

    def artifact_key(self, backend: str) -> str:
        return self.artifact_for.get(backend, self.artifact)


BACKENDS: dict[str, Backend] = {}
PRECISIONS: dict[str, Precision] = {}
AUTO = "auto"
# (input names in order, output names they must start with) a session must have; None: not checked
IoCheck = tuple[tuple[str, ...] | None, tuple[str, ...] | None]


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def register_precision(precision: Precision) -> Precision:
    PRECISIONS[precision.name] = precision
    return precision


def check_combination(backend: str, precision: str) -> None:
    """ValueError naming both when a backend does not run a precision (e.g. bf16 on onnxruntime's CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    prec, engine = PRECISIONS[precision], BACKENDS.get(backend)
    if prec.backends is not None and backend not in prec.backends:
        raise ValueError(
            f"precision {precision!r} runs on backend {' or '.join(map(repr, prec.backends))}, "
            f"got backend={backend!r}"
        )
    if engine is not None and engine.precisions is not None and precision not in engine.precisions:
        raise ValueError(
            f"backend {backend!r} runs precision {' or '.join(map(repr, engine.precisions))}, "
            f"got precision={precision!r}"
        )


def backend_names() -> tuple[str, ...]:
    """What load(backend=...) accepts."""
    return (AUTO, *BACKENDS)


def auto_order() -> list[Backend]:
    return sorted((b for b in BACKENDS.values() if b.auto_rank is not None), key=lambda b: b.auto_rank or 0)


def _tensorrt_options(request: SessionRequest) -> dict[str, Any]:
    manifest = request.manifest
    cache = request.cache_dir or (
        manifest.directory / "trt_cache" if manifest else request.model_file.parent / "trt_cache"
    )
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": request.precision == "fp16",
    }
    if manifest is not None:
        options.update(_trt_profile(manifest))
    return options


def _trt_profile(manifest: Manifest) -> dict[str, str]:
    """TensorRT optimisation profile over (batch, utterances): min 1x1, opt 1x50, max max_batch x max_len."""
    trt = manifest.artifacts.get("tensorrt")
    profile = (trt and trt.profile) or {
        "min": [1, 1],
        "opt": [1, 50],
        "max": [manifest.max_batch, manifest.max_len],
    }

    def shapes(b: int, n: int) -> str:
        dims = [f"{m}:{b}x{n}x{manifest.feature_dims[m]}" for m in manifest.modalities]
        return ",".join([*dims, f"speaker:{b}x{n}", f"mask:{b}x{n}"])

    return {f"trt_profile_{k}_shapes": shapes(*profile[k]) for k in ("min", "opt", "max")}


_GPU_INSTALL = "install onnxruntime-gpu (pip install 'cmath[gpu]') on a machine with an NVIDIA GPU"
register_backend(
    Backend("cpu", "CPUExecutionProvider", "it ships with every onnxruntime", auto_rank=1, fallbacks=())
)
register_backend(Backend("cuda", "CUDAExecutionProvider", _GPU_INSTALL, auto_rank=0))
# TensorRT is opt-in: its first load builds an engine, which takes minutes.
register_backend(
    Backend(
        "tensorrt",
        "TensorrtExecutionProvider",
        f"{_GPU_INSTALL}, with the TensorRT libraries from NVIDIA's index",
        fallbacks=("CUDAExecutionProvider", "CPUExecutionProvider"),
        options=_tensorrt_options,
        prepare=lambda opts: Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True),
    )
)

# OpenVINO (optional extra): compiles the same model.onnx itself; f32 unless bf16 is asked for, read back at load.
register_backend(
    Backend(
        "openvino",
        "OpenVINO CPU",
        "pip install 'cmath[openvino]'",
        opener=lambda request, threads: _open_openvino(request, threads),
        precisions=("fp32", "bf16"),
    )
)

register_precision(Precision("fp32", "fp32"))
# TensorRT builds its fp16 engine from the fp32 ONNX (trt_fp16_enable), so it loads model.onnx.
register_precision(
    Precision(
        "fp16",
        "fp16",
        {"tensorrt": "fp32"},
        "fp16 on the CPU provider: fp16 weights, most ops computed in fp32 (weight rounding only)",
    )
)

# int8 weights (cmath-export --int8) on onnxruntime's CPU provider, refused without a passed agreement record.
register_precision(Precision("int8", "int8", backends=("auto", "cpu"), needs_agreement=True))
# bf16: OpenVINO compiles model.onnx with INFERENCE_PRECISION_HINT=bf16 (never taken silently as fp32).
register_precision(Precision("bf16", "fp32", backends=("openvino",)))


def _open_openvino(request: SessionRequest, threads: int | None) -> tuple[Any, str]:
    from .openvino_backend import OpenVINOSession

    session = OpenVINOSession(request.model_file, request.precision, threads, request.static_shapes)
    return session, session.describe()


@dataclass(frozen=True)
class SessionInfo:
    session: Any  # onnxruntime.InferenceSession
    backend: str  # what actually runs: "cpu", "cuda", "tensorrt", ...
    providers: tuple[str, ...]  # session.get_providers()
    model_file: Path
    threads: int | None  # intra-op threads of the CPU provider (None: onnxruntime's default)
    note: str  # fallbacks and caveats, "" when none
    precision: str = "fp32"
    spinning: bool = False


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def session_options(threads: int | None, spinning: bool = False) -> Any:
    """Sequential execution, all graph optimisations, `threads` intra-op threads. Idle workers sleep instead of
    spinning unless `spinning`: on a shared or busy machine (an agent's), spinning threads steal the cores the
    other threads need."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3  # errors only; fallbacks are reported by us, not by onnxruntime's log
    return opts


def open_probe_session(
    model: bytes, threads: int | None = 1, optimize: bool = True, spinning: bool = False
) -> Any:
    """A plain CPU session on an in-memory graph that is not an artifact: the benchmarks' measuring instruments
    (the matmul-peak probe; the FLOP counter, which needs `optimize=False` so every node stays visible)."""
    import onnxruntime as ort

    opts = session_options(threads, spinning)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def open_session(
    model_file: str | Path,
    backend: str = "cpu",
    *,
    precision: str = "fp32",
    threads: int | None = None,
    spinning: bool = False,
    manifest: Manifest | None = None,
    cache_dir: Path | None = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    what: str = "model",
    static_shapes: int = 0,
) -> SessionInfo:
    """Create an onnxruntime session for `backend` ("auto" tries the table's auto order) and verify what runs it.

    inputs: the graph's input names, in order, if they must be checked; outputs: the names its outputs must
    start with. A mismatch or a file onnxruntime cannot load is an ArtifactError naming the file (`what` says
    which graph); a backend that cannot run here is a BackendUnavailableError (only "auto" falls back).
    static_shapes: backend "openvino" only, how many input shapes get a model compiled for that exact shape.
    """
    model_file = Path(model_file)
    _check_arguments(backend, threads, static_shapes)
    request = SessionRequest(model_file, precision, manifest, cache_dir, static_shapes)
    check = (tuple(inputs) if inputs is not None else None, tuple(outputs) if outputs is not None else None)
    opener = BACKENDS[backend].opener if backend != AUTO else None
    if opener is not None:  # an engine of its own (OpenVINO)
        session, note = opener(request, threads)
        _check_io(session, model_file, check, what)
        return SessionInfo(
            session,
            backend,
            tuple(session.get_providers()),
            model_file,
            getattr(session, "threads", threads),
            note,
            precision,
            spinning,
        )
    if backend != AUTO:
        return _open_provider(backend, request, threads, spinning, check, what)
    return _open_auto(request, threads, spinning, check, what)


def _check_arguments(backend: str, threads: int | None, static_shapes: int) -> None:
    if backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(backend_names())}, got {backend!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
    if static_shapes and backend != "openvino":
        raise ValueError(
            f"static_shapes: only backend='openvino' compiles a model per input shape, got "
            f"static_shapes={static_shapes!r} with backend={backend!r}"
        )


def _open_provider(
    backend: str, request: SessionRequest, threads: int | None, spinning: bool, check: IoCheck, what: str
) -> SessionInfo:
    """A session on exactly `backend`'s onnxruntime provider; BackendUnavailableError when it is not listed or
    does not come up (onnxruntime fell back by itself)."""
    wanted, available = BACKENDS[backend], available_providers()
    if wanted.provider not in available:
        raise BackendUnavailableError(_missing_provider(wanted, available))
    info = _create(wanted, request, threads, spinning, check, what)
    if info.backend != backend:
        raise BackendUnavailableError(
            f"backend {backend!r} was requested and onnxruntime lists {wanted.provider}, but the session came "
            f"up on {list(info.providers)}: the provider could not start here (no NVIDIA GPU, or missing "
            f"CUDA/cuDNN/TensorRT libraries). Use backend='cpu', or backend='auto' to fall back."
        )
    return info


def _open_auto(
    request: SessionRequest, threads: int | None, spinning: bool, check: IoCheck, what: str
) -> SessionInfo:
    """A session on the first listed provider of the auto order; one that onnxruntime moved to another provider
    by itself (listed but cannot start) is kept, with a warning."""
    available = available_providers()
    for candidate in auto_order():
        if candidate.provider not in available:
            continue
        info = _create(candidate, request, threads, spinning, check, what)
        if info.backend == candidate.name:
            return info
        note = f"auto: {candidate.provider} is listed but could not start here; running on {info.backend}"
        warnings.warn(note, RuntimeWarning, stacklevel=4)  # open_session's caller's caller
        return replace(info, note="; ".join(n for n in (note, info.note) if n))
    raise BackendUnavailableError(f"no usable onnxruntime provider among {available}")


def create_session(
    model_file: Path,
    manifest: Manifest,
    backend: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    cache_dir: Path | None = None,
    spinning: bool = False,
    static_shapes: int = 0,
) -> SessionInfo:
    """The exported model's session: open_session with the manifest's inputs and outputs checked."""
    return open_session(
        model_file,
        backend,
        precision=precision,
        threads=threads,
        spinning=spinning,
        manifest=manifest,
        cache_dir=cache_dir,
        inputs=manifest.input_names,
        outputs=("probs", "embedding"),
        what="model",
        static_shapes=static_shapes,
    )


def _create(
    backend: Backend,
    request: SessionRequest,
    threads: int | None,
    spinning: bool,
    check: IoCheck,
    what: str,
) -> SessionInfo:
    import onnxruntime as ort

    providers = backend.providers(request)
    if backend.prepare is not None and isinstance(providers[0], tuple):
        backend.prepare(providers[0][1])
    try:
        session = ort.InferenceSession(
            str(request.model_file), sess_options=session_options(threads, spinning), providers=providers
        )
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        raise ArtifactError(
            request.model_file, f"onnxruntime cannot load this {what} ({first_line(e)})"
        ) from None
    _check_io(session, request.model_file, check, what)
    actual = tuple(session.get_providers())
    first = actual[0] if actual else "none"
    runs_on = next((b.name for b in BACKENDS.values() if b.provider == first), first)
    prec = PRECISIONS.get(request.precision)
    note = prec.cpu_note if prec is not None and runs_on == "cpu" else ""
    return SessionInfo(
        session, runs_on, actual, request.model_file, threads, note, request.precision, spinning
    )


def _check_io(session: Any, model_file: Path, check: IoCheck, what: str) -> None:
    want_in, want_out = check
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if (want_in is not None and inputs != want_in) or (
        want_out is not None and outputs[: len(want_out)] != want_out
    ):
        raise ArtifactError(
            model_file,
            f"{what} graph does not match export.json: inputs {list(inputs)} (expected "
            f"{list(want_in) if want_in is not None else 'any'}), outputs {list(outputs)} "
            f"(expected {list(want_out) if want_out is not None else 'any'} first)",
        )


def _missing_provider(backend: Backend, available: list[str]) -> str:
    import onnxruntime as ort

    return (
        f"backend {backend.name!r} needs onnxruntime's {backend.provider}, which this onnxruntime "
        f"{ort.__version__} does not have (available: {available}); {backend.install}, or use backend='cpu'."
    )


def default_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
