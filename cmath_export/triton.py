"""A Triton Inference Server model repository serving the exported artifact: REPO/cmath/config.pbtxt + 1/model.*.

Batch is Triton's: max_batch_size = --max-batch and the dims below leave it out. The utterance axis is -1
(dynamic). dynamic_batching is on; Triton batches only requests whose inputs have the same shape, so clients
that want their requests batched together pad conversations to a few fixed lengths (docs/serving.md, "NVIDIA's container").
"""

from __future__ import annotations

from pathlib import Path

from cmath_runtime.triton_config import TritonTensor, dynamic_batching, model_config, write_model

from .formats import TRITON_MODEL
from .graph import UTTERANCES, TensorSpec

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
MAX_QUEUE_DELAY_US = 1000


def triton_tensor(spec: TensorSpec) -> TritonTensor:
    """The spec without the batch axis (Triton adds it when max_batch_size > 0); the utterance axis is -1."""
    return TritonTensor(
        spec.name, spec.dtype, tuple(-1 if d == UTTERANCES else int(d) for d in spec.shape[1:])
    )


def config_text(
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    artifact_format: str,
    max_batch: int,
    name: str = TRITON_MODEL,
) -> str:
    platform, filename = PLATFORMS[artifact_format]
    return model_config(
        name,
        max_batch,
        [triton_tensor(s) for s in inputs],
        [triton_tensor(s) for s in outputs],
        platform=platform,
        default_model_filename=filename,
        batching=dynamic_batching(MAX_QUEUE_DELAY_US),
    )


def write_repository(
    repo: Path,
    artifact: Path,
    artifact_format: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch: int,
) -> dict:
    """Write (or replace) REPO/cmath in one rename; other models in REPO are left alone."""
    platform, filename = PLATFORMS[artifact_format]
    write_model(
        repo,
        TRITON_MODEL,
        config_text(inputs, outputs, artifact_format, max_batch),
        {f"1/{filename}": artifact},
    )
    return {
        "repository": str(repo.resolve()),
        "model": TRITON_MODEL,
        "config": f"{TRITON_MODEL}/config.pbtxt",
        "file": f"{TRITON_MODEL}/1/{filename}",
        "platform": platform,
        "max_batch_size": max_batch,
    }
