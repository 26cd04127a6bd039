"""The one error type users of cmath catch: every bad input names the field, what was expected and what came."""

from __future__ import annotations


class CmathError(Exception):
    """Base class of every error cmath raises on purpose."""


class InputError(CmathError, ValueError):
    """Bad input data: `field` is the offending input, `expected` what was wanted, `actual` what came."""

    def __init__(self, field: str, expected: object, actual: object, hint: str = "") -> None:
        self.field, self.expected, self.actual = field, expected, actual
        message = f"{field}: expected {expected}, got {actual}"
        super().__init__(f"{message}. {hint}" if hint else message)


class ArtifactError(CmathError):
    """A checkpoint, ONNX file, engine or manifest that is missing, corrupt, truncated or foreign."""

    def __init__(self, path: object, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


class BackendUnavailableError(CmathError, RuntimeError):
    """A requested execution backend (CUDA, TensorRT, ...) is not available on this machine."""


def first_line(e: BaseException) -> str:
    """An engine's exception in one line (onnxruntime's and OpenVINO's run over many), for our own error message."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
