"""Model registry (timm's create_model): name -> model class, its config and its loss config.

    create_model("cmath", d=64, modalities=("t",), feature_dims={"t": 384})   # or create_model(name, cfg)
    model_config("sdt", **flat_fields)  /  loss_config("sdt", **flat_fields)

Imports go one way: the registry imports the models, no model imports the registry. Flat fields (a preset, the
CLI's options) may carry another model's fields (CMATH's `conv_kernel` for SDT): those are dropped; a field no
registered model knows is an error naming it. A name that does not exist is an error listing the ones that do.
To add a model: write models/<name>.py (model class + `<Name>Config(ModelConfig)` + `<Name>LossConfig(LossConfig)`
beside it) and add one `register(...)` line below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import LossConfig, ModelConfig, Preset, field_names, get_preset
from .models import cmath, dmd, encoder_head, sdt
from .models.common import ConversationModel


@dataclass(frozen=True)
class ModelEntry:
    model: type[ConversationModel]  # built as model(config)
    config: type[ModelConfig]
    loss: type[LossConfig]
    presets: dict[str, Preset]  # the model's own published recipes; override config.PRESETS of the same name
    trainable: bool = True  # False: built from weights trained elsewhere (encoder_head), never by cmath-train


_MODELS: dict[str, ModelEntry] = {}


def register(
    name: str,
    model: type[ConversationModel],
    config: type[ModelConfig],
    loss: type[LossConfig],
    presets: dict[str, Preset] | None = None,
    trainable: bool = True,
) -> None:
    _MODELS[name] = ModelEntry(model, config, loss, dict(presets or {}), trainable)


register(
    "cmath", cmath.CMATH, cmath.CMATHConfig, cmath.CMATHLossConfig
)  # its presets: config.PRESETS (paper)
register("sdt", sdt.SDT, sdt.SDTConfig, sdt.SDTLossConfig, sdt.PRESETS)
register("dmd", dmd.DMD, dmd.DMDConfig, dmd.DMDLossConfig, dmd.PRESETS)
register(
    "encoder_head",
    encoder_head.EncoderHead,
    encoder_head.EncoderHeadConfig,
    encoder_head.EncoderHeadLossConfig,
    trainable=False,  # the fine-tuned encoder's head, shipped by cmath_train/shipped.py
)


def model_names() -> list[str]:
    """The models cmath-train can train."""
    return sorted(name for name, e in _MODELS.items() if e.trainable)


def entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"model: expected one of {model_names()}, got {name!r}")
    return _MODELS[name]


def preset(model: str, name: str) -> Preset:
    """The recipe `name` for `model`: the model's own published one when it has it (SDT's "meld"), else the
    shared preset (config.PRESETS; fields the model does not have are dropped when its configs are built)."""
    own = entry(model).presets
    return own[name] if name in own else get_preset(name)


def _build(cls: type, kind: str, cfg: Any, fields: dict[str, Any]) -> Any:
    values = {**(dataclasses.asdict(cfg) if cfg is not None else {}), **fields}
    own = field_names(cls)
    anywhere = set().union(*(field_names(getattr(e, kind)) for e in _MODELS.values()))
    unknown = sorted(set(values) - anywhere)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields are {sorted(own)}")
    return cls(**{k: v for k, v in values.items() if k in own})


def model_config(name: str, cfg: ModelConfig | None = None, **fields: Any) -> ModelConfig:
    """The model's own config (e.g. CMATHConfig) from a config of any model and/or flat fields."""
    return _build(entry(name).config, "config", cfg, fields)


def loss_config(name: str, cfg: LossConfig | None = None, **fields: Any) -> LossConfig:
    """The model's own loss config (e.g. CMATHLossConfig) from a loss config of any model and/or flat fields."""
    return _build(entry(name).loss, "loss", cfg, fields)


def create_model(name: str, cfg: ModelConfig | None = None, **fields: Any) -> ConversationModel:
    """A model by name, from its config (or any model's config, converted) and/or flat fields."""
    return entry(name).model(model_config(name, cfg, **fields))
