"""cmath-export: freeze a trained run into ONNX (fp32, fp16), TensorRT and Triton artifacts with proven parity.

from cmath_export import export_run
manifest = export_run("runs/main", fp16=True)   # writes runs/main/export/{model.onnx, model.fp16.onnx, export.json}
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_run"]


def export_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See cmath_export.export.export_run (imported lazily: torch loads only when exporting)."""
    from .export import export_run as _export_run

    return _export_run(*args, **kwargs)
