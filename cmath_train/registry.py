"""Model registry (timm's create_model): a name that does not exist is an error listing the ones that do."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import ModelConfig

_MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register(name: str) -> Callable:
    def wrap(builder: Callable[[ModelConfig], nn.Module]) -> Callable[[ModelConfig], nn.Module]:
        _MODELS[name] = builder
        return builder

    return wrap


def model_names() -> list[str]:
    _load_builtin()
    return sorted(_MODELS)


def create_model(name: str, cfg: ModelConfig) -> nn.Module:
    _load_builtin()
    if name not in _MODELS:
        raise ValueError(f"model: expected one of {sorted(_MODELS)}, got {name!r}")
    return _MODELS[name](cfg)


def _load_builtin() -> None:
    from . import models  # noqa: F401  (registers "cmath", "sdt", "dmd")
