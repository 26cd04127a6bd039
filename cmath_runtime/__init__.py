"""cmath_runtime: the torch-free CMATH runtime (numpy + onnxruntime).

    import cmath_runtime
    model = cmath_runtime.load("runs/meld/export")            # backend="auto" | "cpu" | "cuda" | "tensorrt"
    [pred] = model.predict([{"speakers": [0, 1], "features": {"t": t, "a": a, "v": v}}])
    conv = cmath_runtime.Conversation(model).add(0, t=t0, a=a0, v=v0)
    conv.latest.label

The public names are imported lazily, so `import cmath_runtime` stays fast and loads onnxruntime only when a
model is loaded. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, BackendUnavailableError, CmathError, InputError

if TYPE_CHECKING:
    from .conversation import Conversation, Emotion
    from .manifest import Manifest
    from .model import EmotionModel, Prediction, load
    from .streaming import step_batch

__all__ = ["load", "EmotionModel", "Prediction", "Conversation", "Emotion", "step_batch", "Manifest", "read_manifest",
           "CmathError", "InputError", "ArtifactError", "BackendUnavailableError"]

_LAZY = {"load": "model", "EmotionModel": "model", "Prediction": "model", "Conversation": "conversation",
         "Emotion": "conversation", "step_batch": "streaming", "Manifest": "manifest", "read_manifest": "manifest"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
