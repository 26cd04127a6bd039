"""export_run: a trained run -> model.onnx (+ model.fp16.onnx, model.plan) + export.json, parity proven.

The formats come from formats.FORMATS (the table) and are built by their builders (builders.py); nothing here
branches on a format.

Everything is written into a staging folder inside the output folder; only when every artifact passed its
parity bounds are the files moved into place (each by one rename, export.json last, after the old one was
removed), so a failed export leaves the previous export as it was and never a manifest describing other files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmath_runtime.errors import ArtifactError, CmathError
from cmath_runtime.manifest import MANIFEST, Manifest
from cmath_train.checkpoint import Checkpoint, load_checkpoint

from . import formats, parity
from .builders import BuildContext
from .formats import ExportOptions, get_format
from .graph import io_specs
from .manifest import artifact_entry, build_manifest
from .step_graph import STEP_FILE

DEFAULT_SUBDIR = "export"


class ParityError(CmathError):
    """An artifact missed its parity bounds; nothing was promoted. `report` has the numbers."""

    def __init__(self, report: parity.ParityReport) -> None:
        self.report = report
        super().__init__(f"{report.artifact} artifact failed parity, nothing was written:\n{report.summary()}")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fp16: bool = False, tensorrt: bool = False,
               opset: int | None = None, max_len: int = 512, max_batch: int = 64, triton: str | Path | None = None,
               log: Callable[[str], None] | None = None, text_encoder: bool = True, int8: bool = False) -> dict[str, Any]:
    """Export a run; return the manifest written to OUT/export.json (its JSON). Raises CmathError subclasses."""
    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    opts = formats.validate(ExportOptions(fp16, tensorrt, int8, opset, max_len, max_batch,
                                          None if triton is None else Path(triton),
                                          None if out_dir is None else Path(out_dir)))
    out = opts.out_dir or run_dir / DEFAULT_SUBDIR
    for fmt in formats.wanted(opts):
        fmt.check_machine()  # before anything is written
    ckpt = _load(run_dir)
    if opts.triton is not None:
        _staging_dir(opts.triton, "--triton").rmdir()  # fail now, not after minutes of work, if the repository is unwritable
    staging = _staging_dir(out, "--out")
    try:
        manifest = _export(ckpt, run_dir, opts, staging, say)
        if text_encoder:  # the run's sentence encoder, when its features were made from text
            from .parity_data import validation_texts
            from .text_encoder import export_text_encoder, run_encoder_meta

            entry = None
            if run_encoder_meta(ckpt.extra, ckpt.model_cfg.modalities) is not None:
                twins = tuple(p for p, wanted in (("fp16", opts.fp16), ("int8", opts.int8)) if wanted)
                entry = export_text_encoder(ckpt.extra, ckpt.model_cfg.modalities, staging, say=say, twins=twins,
                                            conversations=validation_texts(ckpt),
                                            model_file=staging / manifest.artifacts["fp32"].file)
            manifest = manifest.replace(text_encoder=entry)
        if opts.triton is not None:
            manifest = manifest.replace(triton=_triton(ckpt, opts, staging, manifest))
            say(f"Triton repository: {opts.triton / manifest.triton['config']}")
        _promote(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest.to_json()


def _load(run_dir: Path) -> Checkpoint:
    try:
        return load_checkpoint(run_dir)
    except (KeyError, TypeError, ValueError) as e:  # a config.json of the right format but the wrong content
        raise ArtifactError(run_dir, f"invalid checkpoint ({type(e).__name__}: {e})") from None


def _triton(ckpt: Checkpoint, opts: ExportOptions, staging: Path, manifest: Manifest) -> dict:
    """The Triton repository serves the best artifact built (formats.py serve_rank: engine > fp16 > fp32)."""
    from .triton import PLATFORMS, write_repository

    key = max((get_format(k) for k in manifest.artifacts if get_format(k).format in PLATFORMS),
              key=lambda f: f.serve_rank).key
    art = manifest.artifacts[key]
    inputs, outputs = io_specs(ckpt.model_cfg)
    info = write_repository(opts.triton, staging / art.file, art.format, inputs, outputs, opts.max_batch)
    return {**info, "artifact": key, "sha256": art.sha256}


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


def _export(ckpt: Checkpoint, run_dir: Path, opts: ExportOptions, staging: Path,
            say: Callable[[str], None]) -> Manifest:
    """Every wanted format, in table order, by its builder; each must pass its parity bounds before the next."""
    inputs, outputs = io_specs(ckpt.model_cfg)
    ctx = BuildContext(ckpt, opts, staging, inputs, outputs, say)
    artifacts, reports, extra_versions = {}, {}, {}
    for fmt in formats.wanted(opts):
        built = fmt.build_function()(ctx)
        _require(built.report, say)
        ctx.built[fmt.key] = built
        reports[fmt.key] = built.report.to_json()
        artifacts[fmt.key] = artifact_entry(built.path, fmt, built.precision, **built.extra)
        extra_versions.update(built.versions)
    step = None
    if ckpt.model_cfg.causal and ckpt.model_name == "cmath":  # streaming step graph (cmath_export/step_graph.py)
        from .step_graph import export_step

        step = export_step(ckpt.model, opts.opset, opts.max_len, staging, say)
        for fmt in formats.wanted(opts):  # the formats' twins of the step graph (int8), from the table
            build_step = fmt.step_build_function()
            if build_step is not None:
                step[fmt.key], report = build_step(ctx, step)
                _require(report, say)
                reports[f"step_{fmt.key}"] = report.to_json()
    manifest = build_manifest(ckpt, run_dir, opts, inputs, outputs, artifacts, reports, extra_versions)
    return manifest.replace(step=step)


def _require(report: parity.ParityReport, say: Callable[[str], None]) -> None:
    if not report.passed:
        raise ParityError(report)
    say(report.summary())


def _promote(staging: Path, out: Path, manifest: Manifest) -> None:
    """Move the staged artifacts into OUT: old export.json first out of the way, the new one last."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / MANIFEST)
    for art in manifest.artifacts.values():
        os.replace(staging / art.file, out / art.file)
    staged_step = {f: f for f in _step_files(manifest)}
    for name in {STEP_FILE, *_step_twin_files()} | set(staged_step):
        if name in staged_step:
            os.replace(staging / name, out / name)
        else:  # a step graph (or twin) of an earlier export that this one did not make
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
    for fmt in formats.FORMATS:  # artifacts of an earlier export that this one did not make
        if fmt.key not in manifest.artifacts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / fmt.file)
    from .text_encoder import promote

    promote(staging, out, manifest.text_encoder)
    manifest.write(out)
    _share(out, manifest)


def _share(out: Path, manifest: Manifest) -> None:
    """Staged files are 0600 (mkstemp); artifacts are for other users (a Triton container) too: 0666 - umask."""
    mode = 0o666 & ~_umask()
    names = [MANIFEST, *(a.file for a in manifest.artifacts.values())]
    names += _step_files(manifest)
    for name in names:
        os.chmod(out / name, mode)


def _step_files(manifest: Manifest) -> list[str]:
    """The step graph's file and its twins' (export.json["step"][format key]["file"]), when there is one."""
    if not manifest.step:
        return []
    twins = [manifest.step[f.key]["file"] for f in formats.FORMATS if f.step_builder and f.key in manifest.step]
    return [manifest.step["file"], *twins]


def _step_twin_files() -> list[str]:
    return [f.step_file for f in formats.FORMATS if f.step_file]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
