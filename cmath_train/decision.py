"""The decision rule for weighted-F1: per-class logit offsets chosen on validation, folded into the model.

A model trained with cross-entropy predicts argmax p(c | x); weighted-F1 rewards a different trade-off between
frequent and rare classes. Adding an offset b_c to each class's logit (argmax log p + b) moves that trade-off
without touching the rest of the model. The offsets are chosen on the validation split by coordinate ascent on a
grid, and kept only when they earn it: the validation conversations are cut into two seeded halves, offsets fitted
on each half are scored on the other, and the rule is applied only when that cross-fitted weighted-F1 beats no
offsets. The final offsets (fitted on all of validation) are added to the bias of the model's last linear layer
(`classify_x`), so every engine that runs the model (PyTorch, ONNX fp32 / fp16 / int8, the streaming step graph,
TensorRT, Triton) applies the same rule, inside the export's parity checks, at no cost. The probabilities the model
outputs are then softmax(logits + b): a prior shift, still a distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.types import FeatureSet

GRID = np.round(np.linspace(-1.5, 1.5, 31), 2)  # offsets tried per class, in nats
ROUNDS = 3  # coordinate-ascent sweeps over the classes
MIN_GAIN = 1e-3  # a change of an offset must raise weighted-F1 by this much (fitting noise otherwise)


@dataclass
class DecisionRule:
    offsets: list[float]  # per class, added to the logits
    applied: bool
    reason: str
    validation_weighted_f1_before: float
    validation_weighted_f1_after: float  # with the offsets, on the split they were fitted on (optimistic)
    cross_fitted: dict[str, float] = field(default_factory=dict)  # halves: before / after, honest
    test_weighted_f1_before: float | None = None  # reported, never used to choose
    test_weighted_f1_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"chosen_on": "validation", **asdict(self)}


def fit_offsets(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(C,) offsets maximising weighted-F1 of argmax(log_probs + offsets) on (log_probs, y), by coordinate ascent;
    each move must gain MIN_GAIN and ties keep the smaller offset."""
    num_classes = log_probs.shape[1]
    offsets = np.zeros(num_classes)
    best = _wf1(log_probs, offsets, y)
    for _ in range(ROUNDS):
        moved = False
        for c in range(num_classes):
            for value in sorted(GRID, key=abs):
                trial = offsets.copy()
                trial[c] = value
                score = _wf1(log_probs, trial, y)
                if score > best + MIN_GAIN:
                    best, offsets, moved = score, trial, True
        if not moved:
            break
    return offsets


def choose_rule(log_probs: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> DecisionRule:
    """The rule for a model whose validation log-probabilities are `log_probs` (n, C) with labels `y`; `groups`
    (n,) names each utterance's conversation (the halves never split one)."""
    zero = np.zeros(log_probs.shape[1])
    before = _wf1(log_probs, zero, y)
    ids = np.unique(groups)
    half = np.isin(groups, np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    plain, ruled = [], []
    for fit, score in ((half, ~half), (~half, half)):
        if fit.sum() == 0 or score.sum() == 0:
            continue
        offsets = fit_offsets(log_probs[fit], y[fit])
        plain.append(_wf1(log_probs[score], zero, y[score]))
        ruled.append(_wf1(log_probs[score], offsets, y[score]))
    cross = {"before": float(np.mean(plain)), "after": float(np.mean(ruled))} if plain else {}
    offsets = fit_offsets(log_probs, y)
    earned = bool(cross) and cross["after"] > cross["before"] and bool(np.any(offsets))
    reason = (
        "cross-fitted on validation halves the offsets raise weighted-F1"
        if earned
        else "no gain in cross-fitted weighted-F1 on validation halves: no offsets"
    )
    final = offsets if earned else zero
    return DecisionRule([float(x) for x in final], earned, reason, before, _wf1(log_probs, final, y), cross)


def apply_offsets(model: nn.Module, offsets: list[float]) -> None:
    """Add `offsets` to the bias of the model's final classifier (`classify_x`, inside any wrapper)."""
    layers = [m for name, m in model.named_modules() if name.split(".")[-1] == "classify_x"]
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear) or layers[0].bias is None:
        raise ValueError(
            f"model: expected one final linear layer classify_x with a bias, found {len(layers)}"
        )
    with torch.no_grad():
        layers[0].bias.add_(torch.as_tensor(offsets, dtype=layers[0].bias.dtype))


def apply_decision_rule(run_dir: str | Path, fs: FeatureSet, val_fraction: float, seed: int) -> DecisionRule:
    """Choose the rule for the model in `run_dir` on its validation split, fold it into the checkpoint when it
    earns its place, and record it in the checkpoint's extra ("decision_rule") either way."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .train import make_splits, predict_proba

    ckpt = load_checkpoint(run_dir)
    splits = make_splits(fs, val_fraction, seed)
    mods = tuple(ckpt.model_cfg.modalities)
    y, probs = predict_proba(ckpt.model, splits.val, mods)
    groups = np.concatenate([np.full(int((d.labels >= 0).sum()), i) for i, d in enumerate(splits.val)])
    rule = choose_rule(np.log(np.clip(probs, 1e-12, None)), y, groups, seed)
    if splits.test:
        y_test, p_test = predict_proba(ckpt.model, splits.test, mods)
        log_test = np.log(np.clip(p_test, 1e-12, None))
        rule.test_weighted_f1_before = _wf1(log_test, np.zeros(log_test.shape[1]), y_test)
        rule.test_weighted_f1_after = _wf1(log_test, np.asarray(rule.offsets), y_test)
    if rule.applied:
        apply_offsets(ckpt.model, rule.offsets)
    save_checkpoint(
        run_dir,
        ckpt.model,
        ckpt.model_name,
        ckpt.model_cfg,
        ckpt.loss_cfg,
        ckpt.train_cfg,
        ckpt.label_names,
        {**ckpt.extra, "decision_rule": rule.to_json()},
    )
    return rule


def _wf1(log_probs: np.ndarray, offsets: np.ndarray, y: np.ndarray) -> float:
    """Weighted-F1 of argmax(log_probs + offsets) against y (sklearn's, zero_division=0; this runs ~2k times)."""
    c = log_probs.shape[1]
    pred = (log_probs + offsets).argmax(-1)
    true_n = np.bincount(y, minlength=c)
    pred_n = np.bincount(pred, minlength=c)
    tp = np.bincount(y[pred == y], minlength=c)
    denom = true_n + pred_n
    f1 = np.divide(2 * tp, denom, out=np.zeros(c), where=denom > 0)
    return float((f1 * true_n).sum() / max(1, len(y)))
