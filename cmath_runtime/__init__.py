"""cmath_runtime: the torch-free CMATH runtime (numpy + onnxruntime).

    import numpy as np
    import cmath_runtime

    model = cmath_runtime.load("runs/meld/export")            # backend="auto" | "cpu" | "cuda" | "tensorrt"
    n = 3                                                     # utterances in the conversation
    features = {m: np.zeros((n, d), np.float32) for m, d in model.feature_dims.items()}
    [pred] = model.predict([{"speakers": [0, 1, 0], "features": features}])
    pred.labels, pred.probs                                   # n labels, (n, num_classes) probabilities

    conv = cmath_runtime.Conversation(model)                  # an agent's live conversation
    conv.add(0, **{m: x[0] for m, x in features.items()})     # or conv.add(0, text="...", a=..., v=...)
    conv.latest.label, conv.latest.probs

The public API is `__all__`: `load` -> `EmotionModel` (`predict` -> `Prediction`), `Conversation` (`latest`
-> `Emotion`; `Conversation.step_batch` steps many at once) and the errors. Everything else (the manifest,
sessions, the step graph, state files) is internal and may change. The names are imported lazily, so `import
cmath_runtime` stays fast and loads onnxruntime only when a model is loaded. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, BackendUnavailableError, CmathError, InputError

if TYPE_CHECKING:
    from .conversation import Conversation, Emotion
    from .model import EmotionModel, Prediction, load

__all__ = [
    "load",
    "EmotionModel",
    "Prediction",
    "Conversation",
    "Emotion",
    "CmathError",
    "InputError",
    "ArtifactError",
    "BackendUnavailableError",
]

_LAZY = {
    "load": "model",
    "EmotionModel": "model",
    "Prediction": "model",
    "Conversation": "conversation",
    "Emotion": "conversation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
