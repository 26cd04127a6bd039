"""onnxruntime sessions (rembg-style wrapper): choose providers, create the session, check what really runs.

onnxruntime-gpu lists CUDA and TensorRT providers even on machines without a GPU and then silently runs on
the CPU, so the provider actually used is read back from `session.get_providers()` after creation: an explicit
backend that did not come up is a BackendUnavailableError, "auto" falls back and says so (a warning).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, BackendUnavailableError
from .manifest import Manifest

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "openvino")
PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: OpenVINO only; int8: model.int8.onnx on onnxruntime
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
BACKEND_OF = {v: k for k, v in PROVIDER.items()}
# "auto" tries these in order. TensorRT is opt-in: its first load builds an engine, which takes minutes.
AUTO_ORDER = ("cuda", "cpu")


@dataclass(frozen=True)
class SessionInfo:
    session: Any  # onnxruntime.InferenceSession
    backend: str  # what actually runs: "cpu", "cuda" or "tensorrt"
    providers: tuple[str, ...]  # session.get_providers()
    model_file: Path
    threads: int | None  # intra-op threads of the CPU provider (None: onnxruntime's default)
    note: str  # fallbacks and caveats, "" when none


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def provider_list(backend: str, precision: str, manifest: Manifest, cache_dir: Path | None) -> list[Any]:
    """onnxruntime's provider list for one backend, most preferred first, CPU always last."""
    if backend == "cpu":
        return ["CPUExecutionProvider"]
    if backend == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cache = cache_dir or manifest.directory / "trt_cache"
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": precision == "fp16",
    }
    options.update(_trt_profile(manifest))
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def _trt_profile(manifest: Manifest) -> dict[str, str]:
    """TensorRT optimisation profile over (batch, utterances): min 1x1, opt 1x50, max max_batch x max_len."""
    profile = (manifest.artifacts.get("tensorrt") and manifest.artifacts["tensorrt"].profile) or {
        "min": [1, 1], "opt": [1, 50], "max": [manifest.max_batch, manifest.max_len]}

    def shapes(b: int, n: int) -> str:
        dims = [f"{m}:{b}x{n}x{manifest.feature_dims[m]}" for m in manifest.modalities]
        return ",".join([*dims, f"speaker:{b}x{n}", f"mask:{b}x{n}"])

    return {f"trt_profile_{k}_shapes": shapes(*profile[k]) for k in ("min", "opt", "max")}


def session_options(threads: int | None, spinning: bool = False) -> Any:
    """Sequential execution, all graph optimisations, `threads` intra-op threads. Idle workers sleep instead of
    spinning unless `spinning`: on a shared or busy machine (an agent's), spinning threads steal the cores the
    other thread needs; measured on the 2-core machine under load, no-spin halved the latency with 2 threads."""
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


def create_session(model_file: Path, manifest: Manifest, backend: str = "auto", precision: str = "fp32",
                   threads: int | None = None, cache_dir: Path | None = None, spinning: bool = False) -> SessionInfo:
    """Create the session for `backend` ("auto" tries CUDA then CPU) and verify the provider that runs it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
    if backend == "openvino":
        from .openvino_backend import create_openvino

        return SessionInfo(**create_openvino(model_file, manifest, precision, threads))
    available = available_providers()
    if backend != "auto":
        if PROVIDER[backend] not in available:
            raise BackendUnavailableError(_missing_provider(backend, available))
        info = _create(model_file, manifest, backend, precision, threads, cache_dir, spinning)
        if info.backend != backend:
            raise BackendUnavailableError(
                f"backend {backend!r} was requested and onnxruntime lists {PROVIDER[backend]}, but the session came "
                f"up on {list(info.providers)}: the provider could not start here (no NVIDIA GPU, or missing "
                f"CUDA/cuDNN/TensorRT libraries). Use backend='cpu', or backend='auto' to fall back.")
        return info
    for candidate in AUTO_ORDER:
        if PROVIDER[candidate] not in available:
            continue
        info = _create(model_file, manifest, candidate, precision, threads, cache_dir, spinning)
        if info.backend == candidate:
            return info
        # onnxruntime fell back by itself (a GPU provider that is listed but cannot start): keep that session.
        note = f"auto: {PROVIDER[candidate]} is listed but could not start here; running on {info.backend}"
        warnings.warn(note, RuntimeWarning, stacklevel=3)
        return SessionInfo(**{**info.__dict__, "note": "; ".join(n for n in (note, info.note) if n)})
    raise BackendUnavailableError(f"no usable onnxruntime provider among {available}")


def _create(model_file: Path, manifest: Manifest, backend: str, precision: str, threads: int | None,
            cache_dir: Path | None, spinning: bool) -> SessionInfo:
    import onnxruntime as ort

    providers = provider_list(backend, precision, manifest, cache_dir)
    if backend == "tensorrt":
        Path(providers[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    try:
        session = ort.InferenceSession(str(model_file), sess_options=session_options(threads, spinning),
                                       providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(model_file, f"onnxruntime cannot load this model ({first_line})") from None
    _check_io(session, model_file, manifest)
    actual = tuple(session.get_providers())
    runs_on = BACKEND_OF.get(actual[0], actual[0]) if actual else "none"
    note = "fp16 on the CPU provider: fp16 weights, most ops computed in fp32 (weight rounding only)" if (
        precision == "fp16" and runs_on == "cpu") else ""
    return SessionInfo(session, runs_on, actual, model_file, threads, note)


def _check_io(session: Any, model_file: Path, manifest: Manifest) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != list(manifest.input_names) or outputs[:2] != ["probs", "embedding"]:
        raise ArtifactError(model_file, f"graph does not match export.json: inputs {inputs} (expected "
                                        f"{list(manifest.input_names)}), outputs {outputs} (expected "
                                        f"['probs', 'embedding'])")


def _missing_provider(backend: str, available: list[str]) -> str:
    import onnxruntime as ort

    install = ("install onnxruntime-gpu (pip install 'cmath[gpu]') with the TensorRT libraries from NVIDIA's index"
               if backend == "tensorrt" else "install onnxruntime-gpu (pip install 'cmath[gpu]')")
    return (f"backend {backend!r} needs onnxruntime's {PROVIDER[backend]}, which this onnxruntime "
            f"{ort.__version__} does not have (available: {available}); {install} on a machine with an NVIDIA GPU, "
            f"or use backend='cpu'.")


def default_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
