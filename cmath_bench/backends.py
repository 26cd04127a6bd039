"""The full model's contenders, each a `Contender`: `prepare(conversations)` returns a zero-argument call that
computes that batch the way a caller would, and `probs(result)` turns its result into a (B, N, C) array.

PyTorch eager and torch.compile run the original checkpoint (`load_checkpoint(run_dir).model`, eval mode =
mean path) under torch.inference_mode on tensors made from the same numpy arrays; the runtime runs
`cmath_runtime.EmotionModel.predict` on the conversations themselves, validation and padding included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmath_export.formats import bench_contenders

from .inputs import InputSpec, padded

EAGER, COMPILE, ORT, ORT_CUDA, TENSORRT = (
    "pytorch-eager",
    "torch-compile",
    "onnxruntime",
    "onnxruntime-cuda",
    "tensorrt",
)
ORT_SPIN, OPENVINO = "onnxruntime-spin", "openvino"
# Every runtime contender by its one name (the format table's `bench` pairs, --backends, the records' "backend"):
# name -> (cmath_runtime backend, idle threads spin). onnxruntime-spin is onnxruntime's graph and kernels with idle
# threads spinning (load(spinning=True)): faster on an idle machine, slower than sleeping threads when other work
# shares the cores, so the runtime's default sleeps and every run reports both, with the load average.
RUNTIME = {
    ORT: ("cpu", False),
    ORT_SPIN: ("cpu", True),
    OPENVINO: ("openvino", False),
    ORT_CUDA: ("cuda", False),
    TENSORRT: ("tensorrt", False),
}
# PyTorch, then every (artifact, contender, precision) the export format table lists (cmath_export/formats.py).
ALL = (
    f"{EAGER}:fp32",
    f"{COMPILE}:fp32",
    *(f"{name}:{precision}" for _, name, precision in bench_contenders()),
)
assert all(key.partition(":")[0] in (EAGER, COMPILE, *RUNTIME) for key in ALL), ALL
# PyTorch on a GPU: named with --backends (and by the GPU check), not run by default.
TORCH_CUDA = (f"{EAGER}-cuda:fp32", f"{EAGER}-cuda:fp16", f"{COMPILE}-cuda:fp32")
KNOWN = (*ALL, *TORCH_CUDA)


class Skipped(Exception):
    """This contender cannot run here; the message says why (it becomes the record's note)."""


@dataclass
class Contender:
    """The one contender type of every benchmark: `prepare(inputs)` (untimed) returns the zero-argument call that
    computes those inputs as a caller would (conversations for the full model, a live dialogue for the text path);
    `probs(result)` turns its result into probabilities; `provider` names what runs it; `info` what the benchmark
    learns of it (load time, the work of one call)."""

    backend: str
    precision: str
    provider: str
    prepare: Callable[[Any], Callable[[], Any]]
    probs: Callable[[Any], np.ndarray]
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(1)


def cuda_missing() -> str | None:
    """Why PyTorch cannot run on CUDA here; None where it can."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False; {build})"


def torch_contender(backend: str, precision: str, run_dir: Path, threads: int) -> Contender:
    """PyTorch `backend` (pytorch-eager or torch-compile, "-cuda" for the GPU) on the run's original model, its
    inputs made once on the device; Skipped when it asks for CUDA and there is none. torch.compile(dynamic=True)
    compiles on the first call (and recompiles for shapes it specialised on, such as a length of 1): the benchmark
    times those first calls separately. On a GPU each call ends with the probabilities copied back to numpy and
    torch.cuda.synchronize(), so its time is the GPU's; precision "fp16" runs under torch.autocast (fp16 matmuls,
    fp32 weights)."""
    import torch

    from cmath_train.checkpoint import load_checkpoint

    device = "cuda" if backend.endswith("-cuda") else "cpu"
    if device == "cuda" and (why := cuda_missing()):
        raise Skipped(why)
    set_torch_threads(threads)
    start = time.perf_counter()
    ckpt = load_checkpoint(run_dir)
    load_s = time.perf_counter() - start
    model, cfg = ckpt.model.eval().to(device), ckpt.model_cfg
    spec = InputSpec.of(cfg)

    def forward(features: dict[str, Any], speaker: Any, mask: Any) -> Any:
        return torch.softmax(model(features, speaker, mask).logits, dim=-1)

    if backend.startswith(COMPILE):
        # fewer recompiles: batch 1 is not special-cased
        with contextlib.suppress(ImportError, AttributeError):
            import torch.fx.experimental._config as fx_config

            fx_config.backed_size_oblivious = True
        forward = torch.compile(forward, dynamic=True)
    half = precision == "fp16"
    autocast = (lambda: torch.autocast(device, dtype=torch.float16)) if half else contextlib.nullcontext

    def prepare(convs: list[dict]) -> Callable[[], Any]:
        feats, speaker, mask = padded(spec, convs)
        features = {m: torch.from_numpy(x).to(device) for m, x in feats.items()}
        args = (features, torch.from_numpy(speaker).to(device), torch.from_numpy(mask).to(device))

        def call() -> np.ndarray:
            with torch.inference_mode(), autocast():
                out = forward(*args).float().cpu().numpy()
            if device != "cpu":
                torch.cuda.synchronize()
            return out

        return call

    idle = "sleep (OMP_WAIT_POLICY=PASSIVE)"
    threads_info = {"torch": torch.get_num_threads(), "ort_intra_op": 0, "idle": idle}
    info = {"load_s": load_s, "spec": spec, "threads": threads_info}
    return Contender(backend, precision, f"{device} (torch)", prepare, np.asarray, info=info)


def load_runtime(export_dir: Path, name: str, precision: str, threads: int) -> Any:
    """cmath_runtime's EmotionModel as the contender `name` (a key of RUNTIME), idle threads spinning when the
    contender does; Skipped when that backend or artifact is not here."""
    import cmath_runtime
    from cmath_runtime.session import BACKENDS, available_providers

    backend, spin = RUNTIME[name]
    if backend == "openvino":
        from cmath_runtime.openvino_backend import available

        if not available():
            raise Skipped("openvino is not installed (pip install 'cmath[openvino]')")
    elif backend != "cpu" and (provider := BACKENDS[backend].provider) not in available_providers():
        raise Skipped(
            f"{provider} is not in this onnxruntime ({', '.join(available_providers())}): needs "
            f"an NVIDIA GPU and onnxruntime-gpu{' with TensorRT' if backend == 'tensorrt' else ''}"
        )
    try:
        return cmath_runtime.load(
            export_dir, backend=backend, precision=precision, threads=threads, spinning=spin
        )
    except cmath_runtime.BackendUnavailableError as e:
        raise Skipped(str(e)) from None
    except cmath_runtime.ArtifactError as e:
        if f"no {precision} artifact" in str(e):
            raise Skipped(f"the export has no {precision} model: {e}") from None
        raise


def runtime(export_dir: Path, name: str, precision: str, threads: int) -> Contender:
    """load_runtime's model as a Contender: `predict` on the conversations themselves, validation and padding
    included."""
    model = load_runtime(export_dir, name, precision, threads)

    def prepare(convs: list[dict]) -> Callable[[], Any]:
        return lambda: model.predict(convs, batch_size=len(convs))

    def probs(preds: list[Any]) -> np.ndarray:
        return np.stack([p.probs for p in preds])

    idle = "spin" if RUNTIME[name][1] else "sleep (allow_spinning=0)"
    info = {
        "load_s": model.load_seconds,  # includes importing onnxruntime
        "spec": InputSpec.of(model.manifest),
        "threads": {"torch": 0, "ort_intra_op": threads, "idle": idle},
    }
    return Contender(name, precision, model.providers[0], prepare, probs, model.note, info)
