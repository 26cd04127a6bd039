"""The one table of export artifacts (ultralytics' export_formats()) and the checks on the options that pick them.

Every artifact `cmath-export` can write is a row here: its files, how it is asked for, which runs have it, where
it can be built, what it needs, the function that builds it, what Triton serves and what the benchmark runs. Model
formats (fp32, fp16, int8, TensorRT) go to export.json "artifacts"; companion rows (the streaming step graph, the
text encoder, the Triton repository) build on them and each fill their own export.json field. The table drives
the CLI's --list-formats, the checks before anything is written, the export loop and the promotion of the staged
files (export.py has no branch per artifact) and the benchmark's runtime contenders. Invalid combinations are
rejected before anything is written, with a message that names the fix. A new artifact is one row plus its
builder (see cmath_export/builders.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmath_runtime.errors import CmathError

MIN_OPSET, MAX_OPSET = (
    18,
    23,
)  # the dynamo exporter emits opset 18+; onnxruntime 1.18+ runs up to 23 (LayerNorm: 17+)
DEFAULT_OPSET = 20
TRITON_MODEL = "cmath"


class OptionError(CmathError, ValueError):
    """An invalid export option or combination of options; the message names the fix."""


@dataclass(frozen=True)
class ExportFormat:
    key: str  # key in export.json "artifacts" and "parity", or a companion's own export.json field
    name: str
    flag: str  # the CLI option that asks for it ("" = always written); ExportOptions has the same field
    file: str
    format: str  # "onnx" | "tensorrt" | "triton"
    precision: str  # in words, for the table
    builds_on: str  # "cpu" = any machine; "gpu" = needs an NVIDIA GPU
    needs: tuple[str, ...]  # Python packages needed to build it (checked before anything is written)
    # "module:function" building it (cmath_export.builders): (ctx) -> builders.Built for a model format,
    # builders.Companion for a companion; imported only when it is wanted
    builder: str
    preflight: str | None = None  # "module:function" checking the machine before anything is written
    serve_rank: int = 0  # Triton serves the built artifact of highest rank
    # (contender, precision) pairs the benchmark runs it with; contender names: cmath_bench/backends.py RUNTIME
    bench: tuple[tuple[str, str], ...] = ()
    # "module:function" building this format's twin of the step graph (causal runs): (ctx, step entry) ->
    # (entry stored as export.json["step"][key], parity report); None: the format has no step twin
    step_builder: str | None = None
    companion: bool = (
        False  # True: built after the model formats, into export.json[key] instead of "artifacts"
    )
    applies: str | None = None  # "module:function" (ctx) -> bool: whether this run has it (None: every run)
    extra_files: tuple[str, ...] = ()  # other files it may write into the export folder (twins, tokenizer)
    when: str = ""  # when it is written, for the table ("" = its flag, or always)

    @property
    def out_files(self) -> tuple[str, ...]:
        """Every file this row may write into the export folder (the Triton repository is a folder of its own)."""
        return ((self.file,) if self.format != "triton" else ()) + self.extra_files

    def applies_to(self, ctx: Any) -> bool:
        return self.applies is None or bool(_resolve(self.applies)(ctx))

    def step_build_function(self) -> Callable[..., Any] | None:
        return _resolve(self.step_builder) if self.step_builder else None

    def wanted_by(self, opts: ExportOptions) -> bool:
        return not self.flag or bool(getattr(opts, self.flag.removeprefix("--").replace("-", "_")))

    def build_function(self) -> Callable[..., Any]:
        return _resolve(self.builder)

    def check_machine(self) -> None:
        """Before anything is written: the format's own preflight, else its packages must be importable."""
        if self.preflight is not None:
            _resolve(self.preflight)()
            return
        missing = [p for p in self.needs if importlib.util.find_spec(p) is None]
        if missing:
            what = f"{self.flag} needs" if self.flag else f"{self.name} needs"
            raise OptionError(
                f"{what} the Python packages {missing} (pip install {' '.join(missing)}); nothing "
                "was written."
            )


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(
        "fp32",
        "ONNX fp32",
        "",
        "model.onnx",
        "onnx",
        "fp32",
        "cpu",
        ("torch", "onnx", "onnxscript"),
        "cmath_export.builders:build_fp32",
        bench=(
            ("onnxruntime", "fp32"),
            ("onnxruntime-spin", "fp32"),
            ("openvino", "fp32"),
            ("openvino", "bf16"),
            ("onnxruntime-cuda", "fp32"),
        ),
    ),
    ExportFormat(
        "fp16",
        "ONNX fp16",
        "--fp16",
        "model.fp16.onnx",
        "onnx",
        "fp16",
        "cpu",
        ("onnx", "onnxruntime"),
        "cmath_export.builders:build_fp16",
        serve_rank=1,
        bench=(("onnxruntime", "fp16"),),
    ),
    # weight-int8 (cmath_export/quantize.py); with a causal run also model.step.int8.onnx. Not served by Triton.
    ExportFormat(
        "int8",
        "ONNX int8 weights",
        "--int8",
        "model.int8.onnx",
        "onnx",
        "int8 weights, fp32 activations",
        "cpu",
        ("onnx", "onnxruntime"),
        "cmath_export.builders:build_int8",
        bench=(("onnxruntime", "int8"),),
        step_builder="cmath_export.quantize:build_step_int8",
    ),
    ExportFormat(
        "tensorrt",
        "TensorRT engine",
        "--tensorrt",
        "model.plan",
        "tensorrt",
        "fp32, or fp16 with --fp16",
        "gpu",
        ("tensorrt",),
        "cmath_export.builders:build_tensorrt",
        preflight="cmath_export.tensorrt:preflight",
        serve_rank=2,
        bench=(("tensorrt", "fp16"),),
    ),
    # companions: after the model formats, in this order (the text encoder's twins are checked through the built
    # models; Triton serves the best built model)
    ExportFormat(
        "step",
        "ONNX step graph",
        "",
        "model.step.onnx",
        "onnx",
        "fp32 (+ int8 twin with --int8)",
        "cpu",
        ("torch", "onnx", "onnxscript"),
        "cmath_export.builders:build_step",
        companion=True,
        applies="cmath_export.step_graph:has_step",
        extra_files=("model.step.int8.onnx",),
        when="causal CMATH runs",
    ),
    ExportFormat(
        "text_encoder",
        "Text encoder",
        "",
        "text_encoder.onnx",
        "onnx",
        "fp32 (+ fp16 / int8 twins)",
        "cpu",
        ("torch", "onnx"),
        "cmath_export.builders:build_text_encoder",
        companion=True,
        applies="cmath_export.text_encoder:has_text_encoder",
        extra_files=(
            "text_encoder.fp16.onnx",
            "text_encoder.int8.onnx",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ),
        when="runs whose text features name their encoder (--no-text-encoder skips it)",
    ),
    ExportFormat(
        "triton",
        "Triton repository",
        "--triton",
        f"DIR/{TRITON_MODEL}/config.pbtxt",
        "triton",
        "of the model it serves",
        "cpu",
        (),
        "cmath_export.builders:build_triton",
        companion=True,
        when=f"--triton DIR (+ DIR/{TRITON_MODEL}/1/model.onnx or model.plan)",
    ),
)


def register_format(fmt: ExportFormat) -> None:
    """Add a row (e.g. int8); an ExportOptions field named like its flag asks for it. A model format goes after the
    other model formats, before the companions (which build on every model built); a companion goes last."""
    global FORMATS
    rows = [f for f in FORMATS if f.key != fmt.key]
    at = len(rows) if fmt.companion else next((i for i, f in enumerate(rows) if f.companion), len(rows))
    FORMATS = (*rows[:at], fmt, *rows[at:])


def wanted(opts: ExportOptions) -> list[ExportFormat]:
    """The formats these options ask for, in table order (fp32 first: the others build on it)."""
    return [f for f in FORMATS if f.wanted_by(opts)]


def bench_contenders() -> list[tuple[str, str, str]]:
    """(format key, contender, precision) for every artifact the benchmark runs, in table order."""
    return [(f.key, backend, precision) for f in FORMATS for backend, precision in f.bench]


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def get_format(key: str) -> ExportFormat:
    for f in FORMATS:
        if f.key == key:
            return f
    raise KeyError(f"export format: expected one of {[f.key for f in FORMATS]}, got {key!r}")


def format_table() -> str:
    """The table as markdown, for `cmath-export --list-formats` and the docs."""
    rows = ["| format | option | file | precision | builds on | needs |", "|---|---|---|---|---|---|"]
    for f in FORMATS:
        rows.append(
            f"| {f.name} | {f.when or f.flag or '(always)'} | `{f.file}` | {f.precision} | "
            f"{f.builds_on.upper()} | {', '.join(f.needs) or '-'} |"
        )
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
    text_encoder: bool = True  # bundle the run's text encoder when it has one

    def wanted(self) -> list[ExportFormat]:
        return wanted(self)


def validate(opts: ExportOptions) -> ExportOptions:
    """Reject invalid values and combinations before any work; return the options with defaults filled in."""
    opset = DEFAULT_OPSET if opts.opset is None else opts.opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(
            f"--opset {opset} is not supported: use an opset from {MIN_OPSET} to {MAX_OPSET} "
            f"(default {DEFAULT_OPSET})."
        )
    if opts.max_len < 1:
        raise OptionError(f"--max-len {opts.max_len}: expected at least 1 utterance, e.g. --max-len 512.")
    if opts.max_batch < 1:
        raise OptionError(
            f"--max-batch {opts.max_batch}: expected at least 1 conversation, e.g. --max-batch 64."
        )
    if (
        opts.triton is not None
        and opts.out_dir is not None
        and Path(opts.triton).resolve() == Path(opts.out_dir).resolve()
    ):
        raise OptionError(
            "--triton and --out name the same folder: give the Triton repository its own folder, "
            "e.g. --triton triton_repo."
        )
    return ExportOptions(
        opts.fp16,
        opts.tensorrt,
        opts.int8,
        opset,
        opts.max_len,
        opts.max_batch,
        None if opts.triton is None else Path(opts.triton),
        None if opts.out_dir is None else Path(opts.out_dir),
        opts.text_encoder,
    )
