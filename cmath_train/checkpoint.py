"""Checkpoints carry their own recipe: model.safetensors + config.json, written atomically.

config.json: {"format": "cmath-checkpoint", "version": 1, "model_name", "model", "loss", "train",
              "label_names", "data", "versions", "selected": {epoch, metric, value}[, "cdat"]}
"model" and "loss" are the model's own configs (e.g. CMATHConfig / CMATHLossConfig, registry.py). "cdat" (a
cdat.CDaTConfig) is there when the model was trained inside the CDaT add-on: the weights are then the wrapper's
(transfer encoders, the wrapped model under "model.", ConfidNet) and load_checkpoint rebuilds the wrapper. Files
written before each model had its own config carry every model's fields in one flat dict; the registry reads
both (other models' fields are dropped), so the version stays 1.
Export and runtime rebuild the model from config.json + weights, never from defaults in code.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import atomic_write_bytes, atomic_write_json, read_tagged_json

from .cdat import CDaT, CDaTConfig
from .config import LossConfig, ModelConfig, TrainConfig, from_dict, to_dict
from .models.common import ConversationModel
from .registry import create_model, loss_config, model_config

FORMAT, VERSION = "cmath-checkpoint", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
PREVIOUS = WEIGHTS + ".prev"  # the previous weights while a save is in progress


@dataclass
class Checkpoint:
    model: ConversationModel
    model_name: str
    model_cfg: ModelConfig
    loss_cfg: LossConfig
    train_cfg: TrainConfig
    label_names: list[str]
    extra: dict[str, Any]  # data description, selection, versions
    cdat: CDaTConfig | None = None  # the CDaT add-on's recipe when `model` is a cdat.CDaT wrapper


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    model_name: str,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    label_names: list[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    run_dir = Path(run_dir)
    model_cfg = model_config(model_name, getattr(model, "cfg", model_cfg))  # what the model really read
    loss_cfg = loss_config(model_name, loss_cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = st_save(state)
    # Crash safety: config.json (the commit point) records the weights' sha256; the previous weights stay
    # reachable as WEIGHTS.prev (a hard link) until the new config is in place, so a kill between the two
    # writes still loads the previous checkpoint (load_checkpoint), never new weights under an old config.
    weights, prev = run_dir / WEIGHTS, run_dir / PREVIOUS
    if _consistent(
        run_dir
    ):  # (after an interrupted save, the surviving previous weights stay where they are)
        tmp = run_dir / f".{PREVIOUS}.tmp"
        tmp.unlink(missing_ok=True)
        os.link(weights, tmp)
        os.replace(tmp, prev)
    atomic_write_bytes(weights, data)
    atomic_write_json(
        run_dir / CONFIG,
        {
            # extra first: what this save writes below always wins over a reloaded checkpoint's extra
            **(extra or {}),
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "format": FORMAT,
            "version": VERSION,
            "model_name": model_name,
            "model": to_dict(model_cfg),
            "loss": to_dict(loss_cfg),
            "train": to_dict(train_cfg),
            "label_names": list(label_names),
            **({"cdat": to_dict(model.cdat_cfg)} if isinstance(model, CDaT) else {}),
            "versions": versions(),
        },
    )
    prev.unlink(missing_ok=True)
    return run_dir


def _consistent(run_dir: Path) -> bool:
    """Weights and config.json of one save are both in place (a checkpoint without a recorded sha256 counts)."""
    try:
        want = read_config(run_dir).get("weights_sha256")
        return (run_dir / WEIGHTS).is_file() and (not want or _sha256(run_dir / WEIGHTS) == want)
    except ArtifactError:
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise ArtifactError(run_dir, "not a run directory (it does not exist)")
    if not path.is_file():
        raise ArtifactError(run_dir, f"no checkpoint here: {CONFIG} is missing (train one with cmath-train)")
    return read_tagged_json(path, FORMAT, VERSION, "checkpoint config")


def load_checkpoint(run_dir: str | Path, map_location: str = "cpu") -> Checkpoint:
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    try:
        name = cfg.get("model_name", "cmath")
        model_cfg = model_config(name, **cfg["model"])
        loss_cfg = loss_config(name, **cfg.get("loss", {}))
        train_cfg = from_dict(TrainConfig, cfg.get("train", {}))
        model = create_model(name, model_cfg)
        cdat = from_dict(CDaTConfig, cfg["cdat"]) if cfg.get("cdat") else None
        if cdat is not None:
            model = CDaT(model, cdat)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(run_dir / CONFIG, f"invalid model config: {e}") from None
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(run_dir, f"no checkpoint here: {WEIGHTS} is missing")
    raw = weights.read_bytes()
    want, replaced = cfg.get("weights_sha256"), False
    if want and hashlib.sha256(raw).hexdigest() != want:  # a save was cut short: the previous weights match
        prev = run_dir / PREVIOUS
        old = prev.read_bytes() if prev.is_file() else b""
        if hashlib.sha256(old).hexdigest() == want:
            raw = old
        else:
            replaced = True  # the checks below name what is wrong; if nothing else is, this is
    try:
        state = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        why = (
            "does not match config.json's weights_sha256 (an interrupted save or a replaced file): "
            if replaced
            else ""
        )
        raise ArtifactError(weights, f"{why}corrupt or truncated safetensors file ({e})") from None
    _check_state(weights, model, state)
    if replaced:
        raise ArtifactError(
            weights, "does not match config.json's weights_sha256 (an interrupted save or a replaced file)"
        )
    model.load_state_dict(state)
    model.to(map_location).eval()
    extra = {k: v for k, v in cfg.items() if k not in ("model", "loss", "train", "label_names", "cdat")}
    return Checkpoint(
        model,
        cfg.get("model_name", "cmath"),
        model_cfg,
        loss_cfg,
        train_cfg,
        list(cfg["label_names"]),
        extra,
        cdat,
    )


def _check_state(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            path,
            f"weights do not match config.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ArtifactError(
                path,
                f"weights do not match config.json: {k} has shape {tuple(state[k].shape)}, "
                f"config implies {tuple(v.shape)}",
            )
        if not torch.isfinite(state[k]).all():
            raise ArtifactError(path, f"weights contain NaN/inf in {k}")
