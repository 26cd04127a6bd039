"""Which model a run ships: the trained context model, or the fine-tuned encoder's own classifier.

cmath-prepare fine-tunes the text encoder with a linear head and stores that head beside the features. A context
model earns its place only by beating the head on validation: `shipped_model` compares them, and when the head wins
`ship_encoder_classifier` makes it the run's model (RUN/model.safetensors + config.json, model "encoder_head"), so
cmath-export, the runtime and the server deliver it, with the fine-tuned encoder in front as always. The trained
model moves to RUN/context_model/, and metrics.json["shipped"] says which one RUN holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import atomic_write_bytes

from .data.types import FeatureSet

CONTEXT_MODEL_DIR = "context_model"  # where the trained model goes when the encoder's classifier is shipped
CHECKPOINT_FILES = ("model.safetensors", "config.json")


def encoder_classifier(fs: FeatureSet) -> dict[str, Any] | None:
    """The fine-tuned text encoder's own classifier (its fine-tuning head, cmath-prepare) scored on the same
    validation (dev) and test utterances; None when the features come from a frozen encoder."""
    from sklearn.metrics import accuracy_score, f1_score

    from .data.features_dir import load_encoder_classifier

    head = load_encoder_classifier(fs)
    if head is None:
        return None
    out: dict[str, Any] = {
        "source": "the fine-tuned encoder's head (cmath-prepare), no conversation context model"
    }
    for split, name in (("dev", "validation"), ("test", "test")):
        if split in head.probs and split in fs.splits:
            y = np.concatenate([d.labels for d in fs.splits[split]])
            pred = head.probs[split].argmax(-1)
            out[f"{name}_weighted_f1"] = float(f1_score(y, pred, average="weighted"))
            out[f"{name}_accuracy"] = float(accuracy_score(y, pred))
    return out


def shipped_model(metrics: dict[str, Any]) -> str:
    """ "cmath" when the run's model beats the encoder's own classifier on validation (or there is none to beat),
    else "encoder_classifier": context did not earn its place on this data."""
    enc = (metrics.get("encoder_classifier") or {}).get("validation_weighted_f1")
    val = metrics.get("validation", {}).get("weighted_f1")
    if enc is None or val is None:
        return "cmath"
    return "cmath" if val > enc else "encoder_classifier"


def ship_encoder_classifier(
    fs: FeatureSet, run_dir: str | Path, validation_weighted_f1: float | None = None
) -> Path:
    """Make the encoder's own classifier the model of `run_dir`; the trained model is kept in run_dir/context_model
    (copied there first, so the run always holds a whole checkpoint). Returns the run directory. The head reads the
    features exactly as in fine-tuning: no standardisation, scaled by the recorded input scale."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data.features_dir import load_encoder_classifier
    from .models.encoder_head import EncoderHead, EncoderHeadConfig, EncoderHeadLossConfig

    run = Path(run_dir)
    head = load_encoder_classifier(fs)
    if head is None or head.weight is None or head.bias is None:
        raise ArtifactError(
            fs.meta.get("path", "features"),
            "the fine-tuned encoder's head (head_weight, head_bias) is missing",
        )
    trained = load_checkpoint(run)
    mods = tuple(trained.model_cfg.modalities)
    if mods != ("t",) or trained.model_cfg.feature_dims["t"] != head.weight.shape[1]:
        raise ArtifactError(
            run,
            f"the encoder's classifier reads the {head.weight.shape[1]}-d text features alone; "
            f"the run's model reads {dict(trained.model_cfg.feature_dims)}",
        )
    cfg = EncoderHeadConfig(
        modalities=mods,
        feature_dims=dict(trained.model_cfg.feature_dims),
        num_classes=len(trained.label_names),
        num_speakers=trained.model_cfg.num_speakers,
        dropout=0.0,
        standardize=False,
        input_scale=head.input_scale,
    )
    model = EncoderHead(cfg)
    with torch.no_grad():
        model.classify_x.weight.copy_(torch.from_numpy(head.weight))
        model.classify_x.bias.copy_(torch.from_numpy(head.bias))
    keep = run / CONTEXT_MODEL_DIR
    keep.mkdir(exist_ok=True)
    for name in CHECKPOINT_FILES:  # the weights first, config.json (the commit point) last; each write atomic
        atomic_write_bytes(keep / name, (run / name).read_bytes())
    selected = {
        "epoch": None,
        "metric": "validation weighted_f1 of the encoder's classifier (cmath-prepare's fine-tuning head)",
        "value": validation_weighted_f1,
    }
    save_checkpoint(
        run,
        model.eval(),
        "encoder_head",
        cfg,
        EncoderHeadLossConfig(),
        trained.train_cfg,
        trained.label_names,
        {**trained.extra, "selected": selected, "context_model": CONTEXT_MODEL_DIR},
    )
    return run


def finish_run(
    fs: FeatureSet,
    run_dir: Path,
    metrics: dict[str, Any],
    val_fraction: float,
    seed: int,
    decision_rule: bool,
) -> None:
    """After training: the baselines on the same features, which model the run ships, and (`decision_rule`) the
    weighted-F1 decision rule folded into it; all recorded in `metrics`."""
    from .decision import apply_decision_rule
    from .seeds import context_free_baseline

    if "baseline_context_free" not in metrics:
        metrics["baseline_context_free"] = context_free_baseline(fs, val_fraction, seed)
    enc = encoder_classifier(fs)
    if enc is not None:
        metrics["encoder_classifier"] = enc
    metrics["shipped"] = shipped_model(metrics)
    if metrics["shipped"] == "encoder_classifier":
        ship_encoder_classifier(fs, run_dir, metrics["encoder_classifier"]["validation_weighted_f1"])
    if decision_rule:
        metrics["decision_rule"] = apply_decision_rule(run_dir, fs, val_fraction, seed).to_json()
