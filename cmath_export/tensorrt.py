"""TensorRT engine from the ONNX graph: thin and isolated, the only GPU code in cmath_export.

`preflight()` runs before anything is exported, so a machine without TensorRT or an NVIDIA GPU gets one
sentence saying what is missing and how to get it, and nothing is written. The engine is built with one
optimisation profile over (batch, utterances) from (1, 1) to (--max-batch, --max-len), FP16 with --fp16 (norms and
softmax preferred in fp32), TF32 off (so fp32 engines match PyTorch's fp32 to the bound in parity.py).
Not exercised on the CPU-only machines this was written on: tests/test_export.py runs it where a GPU is present.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.errors import ArtifactError, BackendUnavailableError

from .graph import TensorSpec
from .parity_data import Feeds

INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
OPT_UTTERANCES = 50
WORKSPACE_BYTES = 2 << 30


def _gpu_count() -> int:
    """NVIDIA GPUs visible through the CUDA driver (0 when there is no driver)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def preflight() -> None:
    """Raise BackendUnavailableError naming what is missing for --tensorrt: an NVIDIA GPU, tensorrt, or both."""
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_gpu = _gpu_count() > 0
    if has_trt and has_gpu:
        return
    if not has_gpu and not has_trt:
        missing = f"an NVIDIA GPU with its CUDA driver and the tensorrt package ({INSTALL})"
    elif not has_gpu:
        missing = "an NVIDIA GPU with its CUDA driver (none is visible on this machine)"
    else:
        missing = f"the tensorrt package ({INSTALL})"
    raise BackendUnavailableError(
        f"--tensorrt needs {missing}; nothing was written, "
        "and the ONNX export works without it (drop --tensorrt)."
    )


def profile(max_batch: int, max_len: int) -> dict[str, list[int]]:
    """(batch, utterances) of the optimisation profile: what the engine accepts and what it is tuned for."""
    return {"min": [1, 1], "opt": [1, min(OPT_UTTERANCES, max_len)], "max": [max_batch, max_len]}


def build_engine(
    onnx_path: Path, inputs: list[TensorSpec], fp16: bool, max_batch: int, max_len: int
) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(onnx_path, f"TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        _keep_fp32(trt, network, config)
    shapes = profile(max_batch, max_len)
    opt_profile = builder.create_optimization_profile()
    for spec in inputs:
        rest = [int(d) for d in spec.shape[2:]]
        opt_profile.set_shape(spec.name, *[tuple(shapes[k] + rest) for k in ("min", "opt", "max")])
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(onnx_path, "TensorRT failed to build an engine (see its log above)")
    return bytes(plan)


def _keep_fp32(trt: Any, network: Any, config: Any) -> None:  # tensorrt and its objects: no type information
    """Norms and softmax stay fp32 in an FP16 engine (TensorRT #2564/#3101: fp16 LayerNorm overflow); a
    preference, not a constraint, so a build never fails over it. Parity is still measured on the engine."""
    kinds = {getattr(trt.LayerType, k) for k in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, k)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    if hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS"):
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)


def engine_outputs(plan: bytes, batches: Sequence[Feeds]) -> tuple[list[dict[str, np.ndarray]], str]:
    """Run the engine on each batch (I/O through torch CUDA tensors); -> (outputs, the runtime in words)."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    stream = torch.cuda.Stream()
    results = []
    for feeds in batches:
        keep = {}
        for name, array in feeds.items():
            keep[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, keep[name].data_ptr())
        out = {}
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            out[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, out[name].data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        results.append({n: t.cpu().numpy() for n, t in out.items()})
    return results, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"
