"""export.json: metadata beside the artifacts, never inside them (docs/artifact-format.md)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from cmath_runtime.files import sha256_file
from cmath_train.checkpoint import WEIGHTS, Checkpoint

from .formats import ExportFormat, ExportOptions
from .graph import TensorSpec

FORMAT, VERSION, MANIFEST = "cmath-export", 1, "export.json"


def artifact_entry(path: Path, fmt: ExportFormat, precision: str, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "format": fmt.format,
            "precision": precision, **extra}


def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "cmath"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return {**out, **(extra or {})}


def build_manifest(ckpt: Checkpoint, run_dir: Path, opts: ExportOptions, inputs: list[TensorSpec],
                   outputs: list[TensorSpec], artifacts: dict[str, dict], parity: dict[str, dict],
                   triton: dict[str, Any] | None, extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    cfg = ckpt.model_cfg
    return {
        "format": FORMAT, "version": VERSION,
        "model_name": ckpt.model_name,
        "modalities": list(cfg.modalities),
        "feature_dims": dict(cfg.feature_dims),
        "num_speakers": cfg.num_speakers,
        "num_classes": cfg.num_classes, "label_names": list(ckpt.label_names),
        "d": cfg.d, "causal": cfg.causal,
        "opset": opts.opset,
        "max_batch": opts.max_batch, "max_len": opts.max_len,
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "artifacts": artifacts,
        "parity": parity,
        "checkpoint": {"run_dir": str(run_dir.resolve()), "weights_sha256": sha256_file(run_dir / WEIGHTS),
                       "selected": ckpt.extra.get("selected")},
        "versions": versions(extra_versions),
        "triton": triton,
        "text_encoder": None,
        "step": None,
    }
