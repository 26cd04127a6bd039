"""Several seeds of one recipe: each selected on validation, test reported as mean +- std over seeds."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.files import atomic_write_json

from .config import LossConfig, ModelConfig, TrainConfig
from .data.types import FeatureSet
from .train import train


def train_seeds(fs: FeatureSet, model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig,
                out_dir: str | Path, seeds: int, model_name: str = "cmath", resume: bool = False,
                progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    runs = []
    for k in range(seeds):
        cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed + k)
        if progress:
            print(f"--- seed {cfg.seed} ({k + 1}/{seeds})")
        runs.append((cfg.seed, train(fs, model_cfg, loss_cfg, cfg, out / f"seed_{cfg.seed}", model_name, resume, progress)))
    summary = summarize(runs, fs.label_names)
    # The run directory itself holds the seed with the best *validation* weighted-F1 (never picked on test).
    best_seed = max(runs, key=lambda r: r[1]["validation"]["weighted_f1"])[0]
    for name in ("model.safetensors", "config.json", "training_curves.png", "confusion_matrix.png"):
        shutil.copy2(out / f"seed_{best_seed}" / name, out / name)
    summary["selected_seed"] = best_seed
    summary["seed_ensemble"] = seed_ensemble(fs, out, [s for s, _ in runs], train_cfg)
    summary["baseline_context_free"] = context_free_baseline(fs, train_cfg.val_fraction, train_cfg.seed)
    atomic_write_json(out / "metrics.json", summary)
    return summary


def seed_ensemble(fs: FeatureSet, out: Path, seeds: list[int], train_cfg: TrainConfig) -> dict[str, Any]:
    """The seeds' averaged class probabilities, scored on validation and test (a reference number: the run
    directory's model stays the single best-validation seed, which is what gets exported)."""
    from .checkpoint import load_checkpoint
    from .metrics import classification_metrics
    from .train import make_splits, predict_proba

    splits = make_splits(fs, train_cfg.val_fraction, train_cfg.seed)
    models = [load_checkpoint(out / f"seed_{s}", map_location=train_cfg.device) for s in seeds]
    result: dict[str, Any] = {"seeds": seeds, "note": "mean of the seeds' probabilities; not the exported model"}
    # without an official dev split each seed validated on its own train fraction: no common validation split
    val = splits.val if splits.val_source == "dev" else []
    for name, dialogues in (("validation", val), ("test", splits.test)):
        if dialogues:
            outs = [predict_proba(c.model, dialogues, c.model_cfg.modalities, device=train_cfg.device) for c in models]
            y, p = outs[0][0], np.mean([o[1] for o in outs], axis=0)
            m = classification_metrics(y, p.argmax(-1), fs.label_names)
            result[name] = {k: m[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
    return result


def context_free_baseline(fs: FeatureSet, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Logistic regression per utterance on the same features (no conversation context), C chosen on validation.

    C is chosen on the split the model is selected on: the official dev split, else the same seeded fraction of
    the train conversations (then the probe is refit on all of train: a baseline at least as strong as ours).
    """
    from .prepare.probe import linear_probe

    out = {}
    for m in fs.modalities:
        r = linear_probe(fs, m, val_fraction=val_fraction, seed=seed)
        out[m] = {"C": r.best_c, "selection": r.selection, "validation_weighted_f1": r.dev_weighted_f1,
                  "test_weighted_f1": r.test_weighted_f1, "test_accuracy": r.test_accuracy}
    return out


def summarize(runs: list[tuple[int, dict[str, Any]]], label_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [s for s, _ in runs], "per_seed": {str(s): _brief(m) for s, m in runs}}
    for split in ("validation", "test"):
        if all(split in m for _, m in runs):
            block = {}
            for key in ("accuracy", "weighted_f1", "macro_f1"):
                vals = np.array([m[split][key] for _, m in runs])
                block[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
            block["per_class_f1"] = {n: float(np.mean([m[split]["per_class_f1"][n] for _, m in runs])) for n in label_names}
            block["confusion_matrix"] = np.sum([m[split]["confusion_matrix"] for _, m in runs], axis=0).tolist()
            out[split] = block
    return out


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    return {"selected_epoch": m["selected_epoch"],
            **{split: {k: m[split][k] for k in ("accuracy", "weighted_f1")} for split in ("validation", "test") if split in m}}
