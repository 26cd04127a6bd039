"""export.json is written from the runtime's own `Manifest` type (cmath_runtime/manifest.py, which also reads
it): here only the export-time facts are gathered (checkpoint, versions, artifact hashes)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from cmath_runtime.files import sha256_file
from cmath_runtime.manifest import FORMAT, MANIFEST, VERSION, Artifact, Manifest
from cmath_train.checkpoint import WEIGHTS, Checkpoint

from .formats import ExportFormat, ExportOptions
from .graph import TensorSpec

__all__ = ["FORMAT", "VERSION", "MANIFEST", "artifact_entry", "versions", "build_manifest"]


def artifact_entry(path: Path, fmt: ExportFormat, precision: str, **extra: Any) -> Artifact:
    return Artifact(
        fmt.key,
        path.name,
        sha256_file(path),
        path.stat().st_size,
        fmt.format,
        precision,
        extra.get("profile"),
        path.parent,
    )


def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "cmath"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return {**out, **(extra or {})}


def build_manifest(
    ckpt: Checkpoint,
    run_dir: Path,
    opts: ExportOptions,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    artifacts: dict[str, Artifact],
    parity: dict[str, dict],
    extra_versions: dict[str, str] | None = None,
) -> Manifest:
    cfg = ckpt.model_cfg
    return Manifest(
        modalities=tuple(cfg.modalities),
        feature_dims=dict(cfg.feature_dims),
        num_speakers=cfg.num_speakers,
        num_classes=cfg.num_classes,
        label_names=tuple(ckpt.label_names),
        d=cfg.d,
        causal=cfg.causal,
        max_batch=opts.max_batch,
        max_len=opts.max_len,
        artifacts=artifacts,
        model_name=ckpt.model_name,
        opset=opts.opset,
        inputs=[s.to_json() for s in inputs],
        outputs=[s.to_json() for s in outputs],
        parity=parity,
        checkpoint={
            "run_dir": str(run_dir.resolve()),
            "weights_sha256": sha256_file(run_dir / WEIGHTS),
            "selected": ckpt.extra.get("selected"),
        },
        versions=versions(extra_versions),
    )
