"""One builder per row of the export table (formats.py names them): each writes its files into the staging folder
and measures their parity with the shared comparator; export.py runs the wanted ones in table order and promotes
the results.

A model format's builder is `build(ctx: BuildContext) -> Built` (its artifact goes to export.json "artifacts"); a
companion's is `build(ctx) -> Companion` (its entry goes to export.json[row key]). To add a format (e.g. int8):
write its builder (here or in its own module), add its row to formats.FORMATS (or `formats.register_format`),
and an ExportOptions field named like its flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import onnx

from cmath_runtime.files import atomic_write_bytes
from cmath_runtime.manifest import Artifact
from cmath_train.checkpoint import Checkpoint

from . import parity
from .formats import ExportOptions, get_format
from .graph import TensorSpec, check_io, export_onnx
from .parity_data import ParityData, load_parity_data


@dataclass
class Built:
    """What a builder made: the staged file, its precision, its parity report, extra manifest fields."""

    path: Path
    precision: str
    report: parity.ParityReport
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the TensorRT profile
    versions: dict[str, str] = field(default_factory=dict)  # versions of the tools that built it
    proto: onnx.ModelProto | None = None  # the ONNX model, for builders that start from it


@dataclass
class Companion:
    """What a companion builder made: its export.json entry and the parity reports that must pass (export.json
    "parity" keys -> report)."""

    entry: dict[str, Any]
    reports: dict[str, parity.ParityReport] = field(default_factory=dict)


@dataclass
class BuildContext:
    ckpt: Checkpoint
    opts: ExportOptions
    staging: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    say: Callable[[str], None]
    built: dict[str, Built] = field(default_factory=dict)  # formats built so far (fp32 first)
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # their export.json entries

    @cached_property
    def data(self) -> ParityData:
        return load_parity_data(self.ckpt, self.opts.max_len, self.opts.max_batch)

    @cached_property
    def reference(self) -> list[parity.Outputs]:
        return parity.torch_outputs(self.ckpt.model, self.data.batches)

    @property
    def opset(self) -> int:
        """The options' opset (formats.validate fills in the default before any builder runs)."""
        if self.opts.opset is None:
            raise ValueError("BuildContext: the export options were not validated (opset is None)")
        return self.opts.opset

    def proto(self, key: str) -> onnx.ModelProto:
        """The ONNX model the builder of `key` made (fp32, fp16, int8), for the builders that start from it."""
        proto = self.built[key].proto
        if proto is None:
            raise ValueError(f"BuildContext: the {key} builder kept no ONNX model")
        return proto

    def path(self, key: str) -> Path:
        return self.staging / get_format(key).file

    def check(self, key: str, run: Callable, bounds: parity.Bounds) -> parity.ParityReport:
        return parity.check_parity(key, self.data, self.reference, run, bounds)


def build_fp32(ctx: BuildContext) -> Built:
    t0 = time.perf_counter()
    proto = export_onnx(ctx.ckpt.model, ctx.opset, ctx.opts.max_len)
    onnx.checker.check_model(proto, full_check=True)
    path = ctx.path("fp32")
    atomic_write_bytes(path, proto.SerializeToString())
    ctx.say(f"model.onnx: exported and checked in {time.perf_counter() - t0:.1f} s")
    report = ctx.check("fp32", lambda b: parity.onnx_outputs(str(path), b), parity.BOUNDS["fp32"])
    return Built(path, "fp32", report, proto=proto)


def build_fp16(ctx: BuildContext) -> Built:
    from .fp16 import convert_fp16

    half = convert_fp16(ctx.proto("fp32"))
    onnx.checker.check_model(half, full_check=True)
    check_io(half, ctx.inputs, ctx.outputs, "model.fp16.onnx")
    path = ctx.path("fp16")
    atomic_write_bytes(path, half.SerializeToString())
    report = ctx.check("fp16", lambda b: parity.onnx_outputs(str(path), b), parity.BOUNDS["fp16"])
    report.notes.append(
        "onnxruntime's CPU provider runs some fp16 nodes in fp32: this checks fp16 weights; "
        "fp16 arithmetic is checked by the TensorRT engine's parity on a GPU"
    )
    return Built(path, "fp16", report, proto=half)


def build_tensorrt(ctx: BuildContext) -> Built:
    import tensorrt as trt

    from . import tensorrt as trt_build

    opts, t0 = ctx.opts, time.perf_counter()
    plan = trt_build.build_engine(ctx.built["fp32"].path, ctx.inputs, opts.fp16, opts.max_batch, opts.max_len)
    path = ctx.path("tensorrt")
    atomic_write_bytes(path, plan)
    ctx.say(f"model.plan: built in {time.perf_counter() - t0:.1f} s")
    precision = "fp16" if opts.fp16 else "fp32"
    report = ctx.check("tensorrt", lambda b: trt_build.engine_outputs(plan, b), parity.BOUNDS[precision])
    return Built(
        path,
        precision,
        report,
        extra={"profile": trt_build.profile(opts.max_batch, opts.max_len)},
        versions={"tensorrt": trt.__version__},
    )


def build_step(ctx: BuildContext) -> Companion:
    """model.step.onnx (causal runs), then each built format's step twin (formats' step_builder, e.g. int8)."""
    from .step_graph import export_step

    entry = export_step(ctx.ckpt.model, ctx.opset, ctx.opts.max_len, ctx.staging, ctx.say)
    reports = {}
    for fmt in (get_format(key) for key in ctx.built):
        build_twin = fmt.step_build_function()
        if build_twin is not None:
            entry[fmt.key], reports[f"step_{fmt.key}"] = build_twin(ctx, entry)
    return Companion(entry, reports)


def build_text_encoder(ctx: BuildContext) -> Companion:
    """The run's sentence encoder as text_encoder.onnx (+ the twins of the precisions built) and its tokenizer."""
    from .parity_data import validation_texts
    from .text_encoder import export_text_encoder

    twins = tuple(p for p in ("fp16", "int8") if p in ctx.built)
    entry = export_text_encoder(
        ctx.ckpt.extra,
        ctx.ckpt.model_cfg.modalities,
        ctx.staging,
        say=ctx.say,
        twins=twins,
        conversations=validation_texts(ctx.ckpt),
        model_file=ctx.built["fp32"].path,
    )
    assert (
        entry is not None
    )  # formats: applies only to runs with a text encoder (text_encoder.has_text_encoder)
    return Companion(entry)


def build_triton(ctx: BuildContext) -> Companion:
    """The Triton repository (--triton DIR) serving the best model built (formats' serve_rank: engine > fp16 > fp32)."""
    from .triton import PLATFORMS, write_repository

    if ctx.opts.triton is None:
        raise ValueError("build_triton: no --triton folder (formats: the row applies only with one)")
    key = max(
        (get_format(k) for k in ctx.artifacts if get_format(k).format in PLATFORMS),
        key=lambda f: f.serve_rank,
    ).key
    art = ctx.artifacts[key]
    info = write_repository(
        ctx.opts.triton, ctx.staging / art.file, art.format, ctx.inputs, ctx.outputs, ctx.opts.max_batch
    )
    ctx.say(f"Triton repository: {ctx.opts.triton / info['config']}")
    return Companion({**info, "artifact": key, "sha256": art.sha256})


def build_int8(ctx: BuildContext) -> Built:
    """Builder of the int8 row (formats.py): model.int8.onnx from the fp32 graph, parity vs PyTorch."""
    from .quantize import quantize_within_bounds

    t0 = time.perf_counter()
    path = ctx.path("int8")
    q, scheme, report = quantize_within_bounds(
        ctx, "int8", ctx.proto("fp32"), path, lambda b: parity.onnx_outputs(str(path), b)
    )
    check_io(q, ctx.inputs, ctx.outputs, "model.int8.onnx")
    ctx.say(f"model.int8.onnx: quantized and checked in {time.perf_counter() - t0:.1f} s")
    report.notes.append(f"weight-int8 MatMuls, scheme {scheme.to_json()}")
    return Built(path, "int8", report, proto=q)
