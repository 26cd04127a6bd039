"""OpenVINO on the CPU (optional extra `openvino`): compiles the same model.onnx / model.step.onnx.

Precision: on a CPU with avx512_bf16 or AMX, OpenVINO's default inference precision is bf16, which must
never be taken for fp32. So the precision is always set (INFERENCE_PRECISION_HINT f32, or bf16 when asked for)
and read back from the compiled model, with the devices that run it (EXECUTION_DEVICES); anything other than
what was asked for is a BackendUnavailableError.

Shapes (`static_shapes`): OpenVINO's CPU kernels run faster on a model compiled for one exact input shape than
on the dynamic one. So the second call with a (batch, utterances) shape among the last RECENT_CALLS compiles
the model for that shape (once, outside the lock: other calls go on) and later calls of that shape run it. At
most `static_shapes` shapes are kept, each with its own copy of the weights; a new shape takes a slot only
from one it out-calls more than twice over (`_for_shape`), so recurring shapes never recompile in turn, and a shape
seen once (a conversation growing by one utterance per call) never pays a compile.

`OpenVINOSession` has the part of onnxruntime.InferenceSession the runtime uses (run, get_inputs, get_outputs,
get_providers), so the model and the step graph run on it unchanged. run() is thread-safe: each thread has its
own infer request per compiled model.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, BackendUnavailableError, first_line

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}  # cmath precision -> OpenVINO INFERENCE_PRECISION_HINT
PRECISIONS = tuple(PRECISION_HINT)
INSTALL = "pip install 'cmath[openvino]'"
SPECIALISE_AFTER = (
    2  # the call of a shape that compiles it: the second, so one-off shapes never pay the compile
)
RECENT_CALLS = 64  # the window in which a shape's calls are counted
_MAX_UNSPECIALISABLE = 1024  # shapes remembered as failing to compile (bounded memory under any input)


def import_openvino() -> Any:
    """The openvino module, or BackendUnavailableError with one sentence saying how to get it."""
    os.environ.setdefault("CI", "true")  # no telemetry prompt/collection in OpenVINO's tools
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'openvino' needs the openvino package, which is not installed "
            f"here ({e}); install it with {INSTALL}, or use backend='cpu'."
        ) from None
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


class _Compiled:
    """A compiled model and its infer requests, one per calling thread."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self._local = threading.local()

    def request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req


class OpenVINOSession:
    """A compiled OpenVINO model with onnxruntime's session interface (the subset cmath uses)."""

    def __init__(
        self,
        model_file: str | Path,
        precision: str = "fp32",
        threads: int | None = None,
        static_shapes: int = 0,
    ) -> None:
        if precision not in PRECISION_HINT:
            raise ValueError(f"precision: the openvino backend runs {list(PRECISIONS)}, got {precision!r}")
        if not isinstance(static_shapes, int) or isinstance(static_shapes, bool) or static_shapes < 0:
            raise ValueError(
                f"static_shapes: expected an integer >= 0 (0 = dynamic shapes only), got {static_shapes!r}"
            )
        ov = import_openvino()
        self._core = ov.Core()
        self._config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINT[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
        }
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self.model_file = Path(model_file)
        try:
            model = self._core.read_model(str(model_file))
            self.compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long multi-line messages
            raise ArtifactError(model_file, f"OpenVINO cannot compile this model ({first_line(e)})") from None
        self.precision = precision
        self.version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        self.inference_precision, self.devices = self._check(self.compiled)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._inputs = [_Port(p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = [_Port(p.get_any_name()) for p in self.compiled.outputs]
        self._dynamic = _Compiled(self.compiled)
        self.static_shapes = static_shapes
        self._model: Any = model if static_shapes else None  # reshaped per shape; the file is read once
        self._static: dict[tuple, _Compiled] = {}
        self._recent: deque[tuple] = deque(maxlen=RECENT_CALLS)  # the input shapes of the last calls
        self._counts: Counter[tuple] = Counter()  # ... and how many of those calls each shape had
        self._compiling: set[tuple] = set()
        self._unspecialisable: set[tuple] = set()
        self._lock = threading.Lock()
        self.compiles = 0  # specialised models compiled so far

    def _check(self, compiled: Any) -> tuple[str, tuple[str, ...]]:
        """The precision and devices `compiled` really runs, or BackendUnavailableError if not the ones asked."""
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16, f16
        actual = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        devices = tuple(str(d) for d in compiled.get_property("EXECUTION_DEVICES"))
        want = PRECISION_HINT[self.precision]
        if actual != want or not all(d.startswith("CPU") for d in devices):
            raise BackendUnavailableError(
                f"OpenVINO compiled {self.model_file.name} for {actual} on {list(devices)}, "
                f"but {want} on the CPU was requested: this CPU/OpenVINO cannot run {self.precision} here."
            )
        return actual, devices

    def _for_shape(self, feeds: dict[str, np.ndarray]) -> _Compiled:
        """The compiled model for these inputs' shapes: a specialised one when this shape has earned one.

        What earns it is the shape's calls among the last RECENT_CALLS: SPECIALISE_AFTER of them while a slot is
        free, else more than twice those of the least-called kept shape, which it replaces. So a phase of one
        shape (a fixed window, a benchmark) compiles it at once, a shape that recurs rarely (each length group of a
        data set predicted twice) never compiles, and more shapes in rotation than slots keep the slots they got
        instead of recompiling in turn. The compile runs outside the lock: meanwhile other threads, and this
        shape's other callers, run the dynamic model."""
        if not self.static_shapes:
            return self._dynamic
        key = tuple((name, tuple(x.shape)) for name, x in sorted(feeds.items()))
        with self._lock:
            if len(self._recent) == RECENT_CALLS:
                old = self._recent[0]
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
            self._recent.append(key)
            self._counts[key] += 1
            entry = self._static.get(key)
            if entry is not None:
                return entry
            full = len(self._static) >= self.static_shapes
            least = min(self._counts[k] for k in self._static) if full else 0
            if (
                key in self._unspecialisable
                or key in self._compiling
                or self._counts[key] < SPECIALISE_AFTER
                or (full and self._counts[key] <= 2 * least)
            ):
                return self._dynamic
            self._compiling.add(key)
        try:
            model = self._model.clone()
            model.reshape(dict(key))
            entry = _Compiled(self._core.compile_model(model, "CPU", self._config))
            self._check(entry.compiled)
        except Exception:  # noqa: BLE001 -- the dynamic model answers this shape exactly as before
            entry = None
        with self._lock:
            self._compiling.discard(key)
            if entry is None:
                if len(self._unspecialisable) < _MAX_UNSPECIALISABLE:
                    self._unspecialisable.add(key)
                return self._dynamic
            if len(self._static) >= self.static_shapes:
                del self._static[min(self._static, key=lambda k: self._counts[k])]
            self._static[key] = entry
            self.compiles += 1
            return entry

    def specialised_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The input shapes that have a model compiled for them, in the order they were compiled."""
        with self._lock:
            return [dict(key) for key in self._static]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        req = self._for_shape(feeds).request()
        req.infer(feeds, share_inputs=True)  # no copy: feeds outlive this synchronous call
        names = output_names or [o.name for o in self._outputs]
        return [np.array(req.get_tensor(name).data, copy=True) for name in names]

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"OpenVINO {'+'.join(self.devices)} {self.inference_precision}"]

    def describe(self) -> str:
        shapes = (
            f", each (batch, utterances) shape compiled for itself once called {SPECIALISE_AFTER} times in "
            f"{RECENT_CALLS} (up to {self.static_shapes} kept)"
            if self.static_shapes
            else ", dynamic shapes"
        )
        return (
            f"OpenVINO {self.version} on {', '.join(self.devices)}, inference precision "
            f"{self.inference_precision}, {self.threads} threads{shapes}"
        )
