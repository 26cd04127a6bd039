"""The configs every model shares, training's config, and presets with the paper's settings (section 5.3).

`ModelConfig` / `LossConfig` hold what every model reads (data shape, width, masking, causality; class weights;
the CDaT add-on has its own config, cdat.py); each model extends them beside itself (models/cmath.py `CMATHConfig`,
`CMATHLossConfig`, models/sdt.py, models/dmd.py) and the registry builds the right one from flat fields
(`registry.model_config(name, **fields)`). Every choice a paper leaves open is a field with our default. A checkpoint stores these dataclasses as JSON, and everything downstream rebuilds
the model from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cmath_runtime.base import MODALITY_ORDER

C = TypeVar("C")


@dataclass
class ModelConfig:
    """What every model reads. A model's own config extends it (CMATHConfig, SDTConfig, DMDConfig)."""

    modalities: tuple[str, ...] = MODALITY_ORDER
    feature_dims: dict[str, int] = field(default_factory=lambda: {"t": 1024, "a": 300, "v": 342})
    num_classes: int = 7
    num_speakers: int = 9
    d: int = 128  # hidden size of every modality (paper: 500 IEMOCAP, 400 MELD)
    heads: int = 8  # attention heads; d must be divisible by it
    ffn_mult: int = 4  # FFN width = ffn_mult * d
    dropout: float = 0.1
    norm_eps: float = 1e-5
    attn_mask_value: float = -1e4  # score of a masked key: finite and fp16-safe (no -inf / -1e9 overflow)
    pos_max_period: float = 10000.0  # sinusoidal positions (6-7)
    standardize: bool = True  # inputs standardised with train mean/std, stored as buffers in the graph
    # Online variant (streaming): each utterance sees only itself and the past.
    causal: bool = False

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if not self.modalities:
            raise ValueError(f"modalities: expected a non-empty subset of {MODALITY_ORDER}, got ()")
        unknown = [m for m in self.modalities if m not in MODALITY_ORDER]
        if unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(
                f"modalities: expected distinct names from {MODALITY_ORDER}, got {self.modalities}"
            )
        self.modalities = tuple(m for m in MODALITY_ORDER if m in self.modalities)  # canonical order t, a, v
        missing = [m for m in self.modalities if m not in self.feature_dims]
        if missing:
            raise ValueError(
                f"feature_dims: expected a size for each modality {self.modalities}, missing {missing}"
            )
        self.feature_dims = {m: int(self.feature_dims[m]) for m in self.modalities}
        if self.d % self.heads:
            raise ValueError(f"heads: expected a divisor of d={self.d}, got {self.heads}")


@dataclass
class LossConfig:
    """What every model's loss reads. A model's own loss config extends it (CMATHLossConfig, ...)."""

    class_weighted: bool = False  # inverse-frequency class weights in every cross-entropy


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 8  # conversations per batch
    weight_decay: float = 0.0
    grad_clip: float = (
        5.0  # max gradient L2 norm before each step: ours, not the paper's (it mentions no clipping)
    )
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (per step)
    ema_warmup: float = (
        10.0  # c in the EMA's warm-up decay min(ema_decay, (1 + n) / (c + n)): the average spans
    )
    # about the last n / (c - 1) of n steps (10: the last ~11 %, TensorFlow's num_updates rule; 4: the last third)
    patience: int = 8  # early stopping: epochs without a better validation weighted-F1
    # > 0 with --seeds N >= 2 (seeds.py): after the N seeds, N students (the same recipe and seeds) are trained with
    # + distill * KL(the seeds' averaged probabilities || the student's prediction) on the train split, and they are
    # the run's result; with one seed there is no ensemble to distil and it does nothing
    distill: float = 0.0
    seed: int = 0
    val_fraction: float = 0.2  # used only when the data has no official dev split
    device: str = "cpu"


@dataclass
class Preset:
    model: dict[str, Any]
    loss: dict[str, Any]
    train: dict[str, Any]


PRESETS: dict[str, Preset] = {
    # Our default for the embedded synthetic data: small and fast on a 2-core CPU.
    "default": Preset(model={"d": 128, "heads": 4}, loss={}, train={}),
    # Paper section 5.3. d=500 is not divisible by 8 heads, so IEMOCAP uses 5 heads (head size 100).
    "iemocap": Preset(
        model={"d": 500, "heads": 5},
        loss={"gamma_mse": 1.0, "gamma_kl": 1.8},
        train={"lr": 3e-3, "batch_size": 16, "val_fraction": 0.2},
    ),
    "meld": Preset(
        model={"d": 400, "heads": 8},
        loss={"gamma_mse": 1.0, "gamma_kl": 1.2},
        train={"lr": 2e-4, "batch_size": 4},
    ),
}

ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (model overrides, loss overrides)
    "none": ({}, {}),
    "wo_mr": ({"modality_reconstruction": False}, {"use_reconstruction": False}),
    "wo_cmat": ({"cross_modal": False}, {}),
    "wo_lld": ({}, {"gamma_mse": 0.0}),
    "wo_hld": ({}, {"gamma_kl": 0.0}),
    "wo_hd": ({}, {"gamma_mse": 0.0, "gamma_kl": 0.0}),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def get_ablation(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if name not in ABLATIONS:
        raise ValueError(f"ablation: expected one of {sorted(ABLATIONS)}, got {name!r}")
    return ABLATIONS[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def coerce(cls: type[C], cfg: Any) -> C:
    """`cfg` as an instance of `cls`: itself when it already is one, else cls built from the fields of cfg that
    cls knows (a plain ModelConfig becomes a CMATHConfig with CMATH's defaults; another model's fields drop)."""
    if isinstance(cfg, cls):
        return cfg
    names = field_names(cls)
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build a config dataclass from JSON; unknown keys are an error naming them (a foreign config)."""
    names = field_names(cls)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known fields are {sorted(names)}")
    return cls(**data)
