"""export_run: a trained run -> model.onnx (+ model.fp16.onnx, model.plan) + export.json, parity proven.

Everything is written into a staging folder inside the output folder; only when every artifact passed its
parity bounds are the files moved into place (each by one rename, export.json last, after the old one was
removed), so a failed export leaves the previous export as it was and never a manifest describing other files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from cmath_runtime.errors import ArtifactError, CmathError
from cmath_runtime.files import atomic_write_bytes, atomic_write_json
from cmath_train.checkpoint import Checkpoint, load_checkpoint

from . import formats, parity
from .formats import ExportOptions, get_format
from .graph import check_io, export_onnx, io_specs
from .manifest import MANIFEST, artifact_entry, build_manifest
from .parity_data import load_parity_data

DEFAULT_SUBDIR = "export"


class ParityError(CmathError):
    """An artifact missed its parity bounds; nothing was promoted. `report` has the numbers."""

    def __init__(self, report: parity.ParityReport) -> None:
        self.report = report
        super().__init__(f"{report.artifact} artifact failed parity, nothing was written:\n{report.summary()}")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fp16: bool = False, tensorrt: bool = False,
               opset: int | None = None, max_len: int = 512, max_batch: int = 64, triton: str | Path | None = None,
               log: Callable[[str], None] | None = None, text_encoder: bool = True, int8: bool = False) -> dict[str, Any]:
    """Export a run; return the manifest written to OUT/export.json. Raises CmathError subclasses on failure."""
    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    opts = formats.validate(ExportOptions(fp16, tensorrt, int8, opset, max_len, max_batch,
                                          None if triton is None else Path(triton),
                                          None if out_dir is None else Path(out_dir)))
    out = opts.out_dir or run_dir / DEFAULT_SUBDIR
    if tensorrt:
        from . import tensorrt as trt_build

        trt_build.preflight()  # before anything is written
    ckpt = _load(run_dir)
    if opts.triton is not None:
        _staging_dir(opts.triton, "--triton").rmdir()  # fail now, not after minutes of work, if the repository is unwritable
    staging = _staging_dir(out, "--out")
    try:
        manifest = _export(ckpt, run_dir, opts, staging, say)
        if text_encoder:  # the run's sentence encoder, when its features were made from text
            from .text_encoder import export_text_encoder

            manifest["text_encoder"] = export_text_encoder(ckpt.extra, ckpt.model_cfg.modalities, staging, say=say)
        if opts.triton is not None:
            manifest["triton"] = _triton(ckpt, opts, staging, manifest)
            say(f"Triton repository: {opts.triton / manifest['triton']['config']}")
        _promote(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _load(run_dir: Path) -> Checkpoint:
    try:
        return load_checkpoint(run_dir)
    except (KeyError, TypeError, ValueError) as e:  # a config.json of the right format but the wrong content
        raise ArtifactError(run_dir, f"invalid checkpoint ({type(e).__name__}: {e})") from None


def _triton(ckpt: Checkpoint, opts: ExportOptions, staging: Path, manifest: dict) -> dict:
    """The Triton repository serves the best artifact built: the engine, else fp16 ONNX, else fp32 ONNX."""
    from .triton import write_repository

    key = "tensorrt" if opts.tensorrt else "fp16" if opts.fp16 else "fp32"
    art = manifest["artifacts"][key]
    inputs, outputs = io_specs(ckpt.model_cfg)
    info = write_repository(opts.triton, staging / art["file"], art["format"], inputs, outputs, opts.max_batch)
    return {**info, "artifact": key, "sha256": art["sha256"]}


def _staging_dir(out: Path, flag: str) -> Path:
    """A fresh folder inside OUT (created if needed); unwritable or non-folder OUT -> ArtifactError."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(out, f"exists and is not a folder; pass {flag} DIR with a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise ArtifactError(out, f"cannot write here ({e.strerror or e}); pass {flag} DIR with a writable "
                                 "folder") from None


def _export(ckpt: Checkpoint, run_dir: Path, opts: ExportOptions, staging: Path, say: Callable[[str], None]) -> dict:
    cfg = ckpt.model_cfg
    inputs, outputs = io_specs(cfg)
    t0 = time.perf_counter()
    fp32 = export_onnx(ckpt.model, opts.opset, opts.max_len)
    onnx.checker.check_model(fp32, full_check=True)
    fp32_path = staging / get_format("fp32").file
    atomic_write_bytes(fp32_path, fp32.SerializeToString())
    say(f"model.onnx: exported and checked in {time.perf_counter() - t0:.1f} s")

    data = load_parity_data(ckpt, opts.max_len, opts.max_batch)
    reference = parity.torch_outputs(ckpt.model, data.batches)
    reports = {"fp32": parity.check_parity("fp32", data, reference, lambda b: parity.onnx_outputs(str(fp32_path), b),
                                           parity.BOUNDS["fp32"])}
    _require(reports["fp32"], say)
    artifacts = {"fp32": artifact_entry(fp32_path, get_format("fp32"), "fp32")}

    if opts.fp16:
        from .fp16 import convert_fp16

        half = convert_fp16(fp32)
        onnx.checker.check_model(half, full_check=True)
        check_io(half, inputs, outputs, "model.fp16.onnx")
        fp16_path = staging / get_format("fp16").file
        atomic_write_bytes(fp16_path, half.SerializeToString())
        report = parity.check_parity("fp16", data, reference, lambda b: parity.onnx_outputs(str(fp16_path), b),
                                     parity.BOUNDS["fp16"])
        report.notes.append("onnxruntime's CPU provider runs some fp16 nodes in fp32: this checks fp16 weights; "
                            "fp16 arithmetic is checked by the TensorRT engine's parity on a GPU")
        reports["fp16"] = report
        _require(report, say)
        artifacts["fp16"] = artifact_entry(fp16_path, get_format("fp16"), "fp16")

    if opts.int8:
        from .quantize import SCHEME, quantize_int8

        t1 = time.perf_counter()
        q = quantize_int8(fp32)
        onnx.checker.check_model(q, full_check=True)
        check_io(q, inputs, outputs, "model.int8.onnx")
        int8_path = staging / get_format("int8").file
        atomic_write_bytes(int8_path, q.SerializeToString())
        say(f"model.int8.onnx: quantized in {time.perf_counter() - t1:.1f} s")
        reports["int8"] = parity.check_parity("int8", data, reference, lambda b: parity.onnx_outputs(str(int8_path), b),
                                              parity.BOUNDS["int8"])
        reports["int8"].notes.append(f"weight-int8 MatMuls (onnxruntime dynamic quantization: {SCHEME.to_json()})")
        _require(reports["int8"], say)
        artifacts["int8"] = artifact_entry(int8_path, get_format("int8"), "int8", scheme=SCHEME.to_json())

    extra_versions = {}
    if opts.tensorrt:
        from . import tensorrt as trt_build

        t1 = time.perf_counter()
        plan = trt_build.build_engine(fp32_path, inputs, opts.fp16, opts.max_batch, opts.max_len)
        plan_path = staging / get_format("tensorrt").file
        atomic_write_bytes(plan_path, plan)
        say(f"model.plan: built in {time.perf_counter() - t1:.1f} s")
        bounds = parity.BOUNDS["fp16" if opts.fp16 else "fp32"]
        reports["tensorrt"] = parity.check_parity("tensorrt", data, reference,
                                                  lambda b: trt_build.engine_outputs(plan, b), bounds)
        _require(reports["tensorrt"], say)
        precision = "fp16" if opts.fp16 else "fp32"
        artifacts["tensorrt"] = artifact_entry(plan_path, get_format("tensorrt"), precision,
                                               profile=trt_build.profile(opts.max_batch, opts.max_len))
        import tensorrt as trt

        extra_versions["tensorrt"] = trt.__version__

    step = None
    if cfg.causal and ckpt.model_name == "cmath":  # streaming step graph (cmath_export/step_graph.py)
        from .step_graph import export_step

        step = export_step(ckpt.model, opts.opset, opts.max_len, staging, say)
        if opts.int8:
            from .quantize import export_step_int8

            step["int8"], reports["step_int8"] = export_step_int8(step, staging, data, reference)
            _require(reports["step_int8"], say)
    manifest = build_manifest(ckpt, run_dir, opts, inputs, outputs, artifacts,
                              {k: r.to_json() for k, r in reports.items()}, None, extra_versions)
    manifest["step"] = step
    return manifest


def _require(report: parity.ParityReport, say: Callable[[str], None]) -> None:
    if not report.passed:
        raise ParityError(report)
    say(report.summary())


def _promote(staging: Path, out: Path, manifest: dict) -> None:
    """Move the staged artifacts into OUT: old export.json first out of the way, the new one last."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / MANIFEST)
    for entry in manifest["artifacts"].values():
        os.replace(staging / entry["file"], out / entry["file"])
    step = manifest.get("step") or {}
    for name, entry in (("model.step.onnx", step), ("model.step.int8.onnx", step.get("int8"))):
        if entry:
            os.replace(staging / entry["file"], out / entry["file"])
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
    for fmt in formats.FORMATS:  # artifacts of an earlier export that this one did not make
        if fmt.key not in manifest["artifacts"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / fmt.file)
    from .text_encoder import promote

    promote(staging, out, manifest.get("text_encoder"))
    atomic_write_json(out / MANIFEST, manifest)
    _share(out, manifest)


def _share(out: Path, manifest: dict) -> None:
    """Staged files are 0600 (mkstemp); artifacts are for other users (a Triton container) too: 0666 - umask."""
    mode = 0o666 & ~_umask()
    names = [MANIFEST, *(a["file"] for a in manifest["artifacts"].values())]
    names += [manifest["step"]["file"]] if manifest.get("step") else []
    names += [manifest["step"]["int8"]["file"]] if (manifest.get("step") or {}).get("int8") else []
    for name in names:
        os.chmod(out / name, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
