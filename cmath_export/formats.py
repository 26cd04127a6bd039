"""The one table of export formats (ultralytics' export_formats()) and the checks on the options that pick them.

Every artifact `cmath-export` can write is a row here: its file, how it is asked for, where it can be built and
which options apply to it. Invalid combinations are rejected before anything is written, with a message that
names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmath_runtime.errors import CmathError

MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter emits opset 18+; onnxruntime 1.18+ runs up to 23 (LayerNorm: 17+)
DEFAULT_OPSET = 20
TRITON_MODEL = "cmath"


class OptionError(CmathError, ValueError):
    """An invalid export option or combination of options; the message names the fix."""


@dataclass(frozen=True)
class ExportFormat:
    key: str  # key in export.json "artifacts" and "parity"
    name: str
    flag: str  # the CLI option that asks for it ("" = always written)
    file: str
    format: str  # "onnx" | "tensorrt"
    precision: str
    builds_on: str  # "cpu" = any machine; "gpu" = needs an NVIDIA GPU
    needs: tuple[str, ...]  # Python packages needed to build it
    options: tuple[str, ...]  # options that shape it


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("fp32", "ONNX fp32", "", "model.onnx", "onnx", "fp32", "cpu",
                 ("torch", "onnx", "onnxscript"), ("opset",)),
    ExportFormat("fp16", "ONNX fp16", "--fp16", "model.fp16.onnx", "onnx", "fp16", "cpu",
                 ("onnx", "onnxruntime"), ("opset",)),
    ExportFormat("int8", "ONNX int8 weights", "--int8", "model.int8.onnx", "onnx", "int8", "cpu",
                 ("onnx", "onnxruntime"), ("opset",)),
    ExportFormat("tensorrt", "TensorRT engine", "--tensorrt", "model.plan", "tensorrt", "fp32, or fp16 with --fp16",
                 "gpu", ("tensorrt",), ("max_batch", "max_len", "fp16")),
)


def get_format(key: str) -> ExportFormat:
    for f in FORMATS:
        if f.key == key:
            return f
    raise KeyError(f"export format: expected one of {[f.key for f in FORMATS]}, got {key!r}")


def format_table() -> str:
    """The table as markdown, for `cmath-export --list-formats` and the docs."""
    rows = ["| format | option | file | precision | builds on | needs |", "|---|---|---|---|---|---|"]
    for f in FORMATS:
        rows.append(f"| {f.name} | {f.flag or '(always)'} | `{f.file}` | {f.precision} | {f.builds_on.upper()} | "
                    f"{', '.join(f.needs)} |")
    rows.append(f"| Triton repository | --triton DIR | `DIR/{TRITON_MODEL}/config.pbtxt` + `1/model.onnx` or "
                "`1/model.plan` | of the artifact it serves | CPU | - |")
    return "\n".join(rows)


@dataclass
class ExportOptions:
    fp16: bool = False
    tensorrt: bool = False
    int8: bool = False
    opset: int | None = None  # None: DEFAULT_OPSET
    max_len: int = 512
    max_batch: int = 64
    triton: Path | None = None
    out_dir: Path | None = None  # None: RUN_DIR/export

    def wanted(self) -> list[ExportFormat]:
        return [f for f in FORMATS if not f.flag or getattr(self, f.flag.removeprefix("--"))]


def validate(opts: ExportOptions) -> ExportOptions:
    """Reject invalid values and combinations before any work; return the options with defaults filled in."""
    opset = DEFAULT_OPSET if opts.opset is None else opts.opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(f"--opset {opset} is not supported: use an opset from {MIN_OPSET} to {MAX_OPSET} "
                          f"(default {DEFAULT_OPSET}).")
    if opts.max_len < 1:
        raise OptionError(f"--max-len {opts.max_len}: expected at least 1 utterance, e.g. --max-len 512.")
    if opts.max_batch < 1:
        raise OptionError(f"--max-batch {opts.max_batch}: expected at least 1 conversation, e.g. --max-batch 64.")
    if opts.triton is not None and opts.out_dir is not None and Path(opts.triton).resolve() == Path(opts.out_dir).resolve():
        raise OptionError("--triton and --out name the same folder: give the Triton repository its own folder, "
                          "e.g. --triton triton_repo.")
    return ExportOptions(opts.fp16, opts.tensorrt, opts.int8, opset, opts.max_len, opts.max_batch,
                         None if opts.triton is None else Path(opts.triton),
                         None if opts.out_dir is None else Path(opts.out_dir))
