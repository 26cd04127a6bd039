"""The one writer of Triton model repositories: config.pbtxt text and the model folder swapped in by one rename.

Two repositories use it: `cmath-export --triton` (Triton's onnxruntime/TensorRT backend serving the exported
graph) and `cmath-serve` (Triton's Python backend running cmath_serve.backend). It lives in the runtime because
both the exporter and the server may import the runtime, and neither may import the other.

Dims leave out the batch axis (Triton adds it when max_batch_size > 0); -1 is a dynamic axis.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_bytes

DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonTensor:
    name: str
    dtype: str  # a key of DTYPES
    dims: tuple[int, ...]  # without the batch axis; -1 = dynamic
    optional: bool = False

    def text(self) -> str:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype expected one of {list(DTYPES)}, got {self.dtype!r}")
        opt = " optional: true" if self.optional else ""
        return f'  {{ name: "{self.name}" data_type: {DTYPES[self.dtype]} dims: {list(self.dims)}{opt} }}'


def model_config(
    name: str,
    max_batch: int,
    inputs: list[TritonTensor],
    outputs: list[TritonTensor],
    *,
    platform: str | None = None,
    default_model_filename: str | None = None,
    backend: str | None = None,
    batching: str = "",
    instance_group: str = "",
    parameters: dict[str, object] | None = None,
) -> str:
    """config.pbtxt: name, platform or backend, max_batch_size, `batching` (a dynamic_batching or
    sequence_batching block, as text), inputs, outputs, `instance_group` (text) and string parameters."""
    if (platform is None) == (backend is None):
        raise ValueError(f"{name}: give exactly one of platform ({platform!r}) and backend ({backend!r})")
    head = f'name: "{name}"\n'
    head += f'platform: "{platform}"\n' if platform is not None else f'backend: "{backend}"\n'
    if default_model_filename is not None:
        head += f'default_model_filename: "{default_model_filename}"\n'
    head += f"max_batch_size: {max_batch}\n"
    text = head + _tensors("input", inputs) + _tensors("output", outputs) + batching + instance_group
    if parameters:
        rows = [
            f'  {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}'
            for k, v in parameters.items()
        ]
        text += "parameters [\n" + ",\n".join(rows) + "\n]\n"
    return text


def dynamic_batching(queue_delay_us: int) -> str:
    return f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"


def _tensors(kind: str, specs: list[TritonTensor]) -> str:
    return f"{kind} [\n" + ",\n".join(s.text() for s in specs) + "\n]\n"


def write_model(repo: Path, name: str, config: str, files: dict[str, bytes | Path]) -> Path:
    """Write (or replace) REPO/NAME: config.pbtxt plus `files` (path inside the model folder -> bytes, or a file
    to copy), staged beside it and swapped in by one rename; other models in REPO are left alone."""
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        for rel, content in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                atomic_write_bytes(target, content)
            else:
                shutil.copyfile(content, target)
        atomic_write_bytes(staging / "config.pbtxt", config.encode())
        os.chmod(staging, 0o755)
        _swap_in(staging, repo / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return repo / name


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
