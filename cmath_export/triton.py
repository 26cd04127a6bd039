"""A Triton Inference Server model repository serving the exported artifact: REPO/cmath/config.pbtxt + 1/model.*.

Batch is Triton's: max_batch_size = --max-batch and the dims below leave it out. The utterance axis is -1
(dynamic). dynamic_batching is on; Triton batches only requests whose inputs have the same shape, so clients
that want their requests batched together pad conversations to a few fixed lengths (docs/serving.md, "NVIDIA's container").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from cmath_runtime.files import atomic_write_bytes

from .formats import TRITON_MODEL
from .graph import UTTERANCES, TensorSpec

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
MAX_QUEUE_DELAY_US = 1000


def triton_dims(spec: TensorSpec) -> list[int]:
    """The shape without the batch axis (Triton adds it when max_batch_size > 0); dynamic axes are -1."""
    return [-1 if d == UTTERANCES else int(d) for d in spec.shape[1:]]


def config_text(inputs: list[TensorSpec], outputs: list[TensorSpec], artifact_format: str, max_batch: int,
                name: str = TRITON_MODEL) -> str:
    platform, filename = PLATFORMS[artifact_format]

    def tensors(specs: list[TensorSpec]) -> str:
        return ",\n".join(f'  {{ name: "{s.name}" data_type: {TRITON_DTYPES[s.dtype]} dims: {triton_dims(s)} }}'
                          for s in specs)

    return (f'name: "{name}"\nplatform: "{platform}"\ndefault_model_filename: "{filename}"\n'
            f"max_batch_size: {max_batch}\n"
            f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}\n")


def write_repository(repo: Path, artifact: Path, artifact_format: str, inputs: list[TensorSpec],
                     outputs: list[TensorSpec], max_batch: int) -> dict:
    """Write (or replace) REPO/cmath in one rename; other models in REPO are left alone."""
    _, filename = PLATFORMS[artifact_format]
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TRITON_MODEL}.", dir=repo))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(artifact, staging / "1" / filename)
        text = config_text(inputs, outputs, artifact_format, max_batch)
        atomic_write_bytes(staging / "config.pbtxt", text.encode())
        os.chmod(staging, 0o755)
        _swap_in(staging, repo / TRITON_MODEL)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"repository": str(repo.resolve()), "model": TRITON_MODEL, "config": f"{TRITON_MODEL}/config.pbtxt",
            "file": f"{TRITON_MODEL}/1/{filename}", "platform": PLATFORMS[artifact_format][0],
            "max_batch_size": max_batch}


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
