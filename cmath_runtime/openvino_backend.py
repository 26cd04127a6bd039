"""OpenVINO on the CPU (optional extra `openvino`): compiles the same model.onnx / model.step.onnx.

Precision is what matters here: on a CPU with avx512_bf16 or AMX, OpenVINO's *default* inference precision is
bf16 (measured on Zen 4: max |dp| 6e-3, argmax agreement 99.4%), which must never be taken as fp32. So the
precision is always set explicitly (INFERENCE_PRECISION_HINT f32 unless bf16 is asked for) and read back from
the compiled model; a compiled model that reports anything else is a BackendUnavailableError. The device that
runs it is read back too (EXECUTION_DEVICES).

`OpenVINOSession` mimics the part of onnxruntime.InferenceSession the runtime uses (run, get_inputs,
get_outputs, get_providers), so the model and the step graph run on it unchanged. run() is thread-safe: each
thread has its own infer request.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, BackendUnavailableError

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}  # cmath precision -> OpenVINO INFERENCE_PRECISION_HINT
PRECISIONS = tuple(PRECISION_HINT)
PROVIDER = "OpenVINO CPU"
INSTALL = "pip install 'cmath[openvino]'"


def import_openvino() -> Any:
    """The openvino module, or BackendUnavailableError with one sentence saying how to get it."""
    os.environ.setdefault("CI", "true")  # no telemetry prompt/collection in OpenVINO's tools
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'openvino' needs the openvino package, which is not installed "
                                      f"here ({e}); install it with {INSTALL}, or use backend='cpu'.") from None
    return openvino


def available() -> bool:
    try:
        import_openvino()
    except BackendUnavailableError:
        return False
    return True


@dataclass(frozen=True)
class _Port:
    name: str


class OpenVINOSession:
    """A compiled OpenVINO model with onnxruntime's session interface (the subset cmath uses)."""

    def __init__(self, model_file: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        if precision not in PRECISION_HINT:
            raise ValueError(f"precision: the openvino backend runs {list(PRECISIONS)}, got {precision!r}")
        ov = import_openvino()
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[precision],
                                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(str(model_file), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(model_file, f"OpenVINO cannot compile this model ({first})") from None
        self.model_file = Path(model_file)
        self.precision = precision
        self.version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16, f16
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.devices = tuple(str(d) for d in self.compiled.get_property("EXECUTION_DEVICES"))
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        want = PRECISION_HINT[precision]
        if self.inference_precision != want or not all(d.startswith("CPU") for d in self.devices):
            raise BackendUnavailableError(
                f"OpenVINO compiled {self.model_file.name} for {self.inference_precision} on {list(self.devices)}, "
                f"but {want} on the CPU was requested: this CPU/OpenVINO cannot run {precision} here.")
        self._inputs = [_Port(p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = [_Port(p.get_any_name()) for p in self.compiled.outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        req = self._request()
        req.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        names = output_names or [o.name for o in self._outputs]
        return [np.array(req.get_tensor(name).data, copy=True) for name in names]

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"{PROVIDER} {self.inference_precision}"]

    def describe(self) -> str:
        return (f"OpenVINO {self.version} on {', '.join(self.devices)}, inference precision "
                f"{self.inference_precision}, {self.threads} threads")


def create_openvino(model_file: Path, manifest: Any, precision: str, threads: int | None) -> dict[str, Any]:
    """The fields of a runtime SessionInfo for `model_file` compiled by OpenVINO (precision read back)."""
    session = OpenVINOSession(model_file, precision, threads)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != list(manifest.input_names) or outputs[:2] != ["probs", "embedding"]:
        raise ArtifactError(model_file, f"graph does not match export.json: inputs {inputs} (expected "
                                        f"{list(manifest.input_names)}), outputs {outputs}")
    return {"session": session, "backend": "openvino", "providers": tuple(session.get_providers()),
            "model_file": Path(model_file), "threads": session.threads, "note": session.describe()}
