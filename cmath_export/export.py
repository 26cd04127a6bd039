"""export_run: a trained run -> model.onnx (+ its twins and companions) + export.json, parity proven.

The artifacts come from formats.FORMATS (the table: model formats, then the step graph, the text encoder and the
Triton repository) and are built by their builders (builders.py) in table order; nothing here branches on an
artifact.

MODEL_CARD.md (model_card.py) is written from the run's records and this export's manifest beside export.json.

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

from . import formats, model_card, parity
from .builders import BuildContext
from .formats import ExportOptions
from .graph import io_specs
from .manifest import artifact_entry, build_manifest

DEFAULT_SUBDIR = "export"


class ParityError(CmathError):
    """An artifact missed its parity bounds; nothing was promoted. `report` has the numbers."""

    def __init__(self, report: parity.ParityReport) -> None:
        self.report = report
        super().__init__(
            f"{report.artifact} artifact failed parity, nothing was written:\n{report.summary()}"
        )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    fp16: bool = False,
    tensorrt: bool = False,
    opset: int | None = None,
    max_len: int = 512,
    max_batch: int = 64,
    triton: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    text_encoder: bool = True,
    int8: bool = False,
) -> dict[str, Any]:
    """Export a run; return the manifest written to OUT/export.json (its JSON). Raises CmathError subclasses."""
    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    opts = formats.validate(
        ExportOptions(
            fp16,
            tensorrt,
            int8,
            opset,
            max_len,
            max_batch,
            None if triton is None else Path(triton),
            None if out_dir is None else Path(out_dir),
            text_encoder,
        )
    )
    out = opts.out_dir or run_dir / DEFAULT_SUBDIR
    for fmt in formats.wanted(opts):
        fmt.check_machine()  # before anything is written
    ckpt = _load(run_dir)
    if opts.triton is not None:
        _staging_dir(
            opts.triton, "--triton"
        ).rmdir()  # fail now, not after minutes of work, if the repository is unwritable
    staging = _staging_dir(out, "--out")
    try:
        manifest = _export(ckpt, run_dir, opts, staging, say)
        (staging / model_card.CARD).write_text(model_card.render(run_dir, manifest), encoding="utf-8")
        _promote(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest.to_json()


def _load(run_dir: Path) -> Checkpoint:
    try:
        return load_checkpoint(run_dir)
    except (KeyError, TypeError, ValueError) as e:  # a config.json of the right format but the wrong content
        raise ArtifactError(run_dir, f"invalid checkpoint ({type(e).__name__}: {e})") from None


def _staging_dir(out: Path, flag: str) -> Path:
    """A fresh folder inside OUT (created if needed); unwritable or non-folder OUT -> ArtifactError."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(out, f"exists and is not a folder; pass {flag} DIR with a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise ArtifactError(
            out, f"cannot write here ({e.strerror or e}); pass {flag} DIR with a writable folder"
        ) from None


def _export(
    ckpt: Checkpoint, run_dir: Path, opts: ExportOptions, staging: Path, say: Callable[[str], None]
) -> Manifest:
    """Every wanted row that applies to this run, in table order, by its builder; each must pass its parity bounds
    before the next. Model formats fill export.json "artifacts", companions their own field."""
    inputs, outputs = io_specs(ckpt.model_cfg)
    ctx = BuildContext(ckpt, opts, staging, inputs, outputs, say)
    reports, companions, extra_versions = {}, {}, {}
    for fmt in formats.wanted(opts):
        if not fmt.applies_to(ctx):
            continue
        built = fmt.build_function()(ctx)
        if fmt.companion:
            for key, report in built.reports.items():
                _require(report, say)
                reports[key] = report.to_json()
            companions[fmt.key] = built.entry
            continue
        _require(built.report, say)
        ctx.built[fmt.key] = built
        reports[fmt.key] = built.report.to_json()
        ctx.artifacts[fmt.key] = artifact_entry(built.path, fmt, built.precision, **built.extra)
        extra_versions.update(built.versions)
    manifest = build_manifest(ckpt, run_dir, opts, inputs, outputs, ctx.artifacts, reports, extra_versions)
    return manifest.replace(**companions)


def _require(report: parity.ParityReport, say: Callable[[str], None]) -> None:
    if not report.passed:
        raise ParityError(report)
    say(report.summary())


def _promote(staging: Path, out: Path, manifest: Manifest) -> None:
    """Move the staged files into OUT: old export.json first out of the way, the new one last (the model card just
    before it). A file a row of the table may write that this export did not make (an earlier export's) is removed."""
    table_files = {name for fmt in formats.FORMATS for name in fmt.out_files}
    unknown = sorted(set(manifest_files(manifest)) - table_files)
    if unknown:  # a builder wrote a file its row does not list: it would be neither promoted nor cleaned up
        raise ArtifactError(staging, f"export.json names {unknown}, which no row of formats.FORMATS lists")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / MANIFEST)
    promoted = []
    for name in dict.fromkeys(name for fmt in formats.FORMATS for name in fmt.out_files):
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
            promoted.append(name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
    os.replace(staging / model_card.CARD, out / model_card.CARD)
    promoted.append(model_card.CARD)
    manifest.write(out)
    mode = (
        0o666 & ~_umask()
    )  # staged files are 0600 (mkstemp); artifacts are for other users (a Triton container) too
    for name in (MANIFEST, *promoted):
        os.chmod(out / name, mode)


def manifest_files(manifest: Manifest) -> list[str]:
    """Every file in the export folder that export.json names: artifacts, the step graph and its twins, the text
    encoder and its tokenizer."""
    names = [a.file for a in manifest.artifacts.values()]
    if manifest.step:
        names += [
            manifest.step["file"],
            *(v["file"] for v in manifest.step.values() if isinstance(v, dict) and "file" in v),
        ]
    if manifest.text_encoder:
        names += [f["file"] for f in manifest.text_encoder["files"].values()]
    return names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
