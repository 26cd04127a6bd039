"""Several seeds of one recipe: each selected on validation, test reported as mean +- std over seeds.

With TrainConfig.distill > 0 (the data-chosen recipe for one modality, recipe.py) the seeds are teachers: their
averaged class probabilities on the train dialogues become soft targets, and N students (same recipe, same seeds)
are trained on labels + distill * KL(ensemble || student). The students are the result (metrics, the run
directory's model); the teachers' own numbers stay in metrics.json under over_seeds.teachers. Distillation is
chosen on validation only: the students generalise better than their teachers because the ensemble's soft
targets carry what the seeds agree on. Costs twice the training time; inference is one model, as before.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.errors import InputError

from .cdat import CDaTConfig
from .config import LossConfig, ModelConfig, TrainConfig
from .data.types import Dialogue, FeatureSet
from .metrics import write_metrics
from .models.common import ConversationModel
from .train import train

DISTILLED_NOTE = (
    "students trained on labels + weight * KL(the teachers' averaged probabilities || student) on the train split; "
    "the students are the result"
)


def train_seeds(
    fs: FeatureSet,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    seeds: int,
    model_name: str = "cmath",
    resume: bool = False,
    progress: bool = True,
    cdat: CDaTConfig | None = None,
) -> dict[str, Any]:
    out = Path(out_dir)
    distil = train_cfg.distill > 0 and seeds > 1
    if distil:
        check_unique_ids(fs.splits["train"])  # before hours of training, not after
    teacher_cfg = dataclasses.replace(train_cfg, distill=0.0)
    runs = _run_seeds(
        fs, model_cfg, loss_cfg, teacher_cfg, out, "seed", seeds, model_name, resume, progress, cdat=cdat
    )
    teacher_models = load_seeds(out, [s for s, _ in runs], train_cfg.device)
    ensemble = seed_ensemble(fs, teacher_models, [s for s, _ in runs], train_cfg)
    if distil:
        dialogues = fs.splits["train"]
        probs = ensemble_probabilities(teacher_models, dialogues, train_cfg.device)
        soft = {d.id: p for d, p in zip(dialogues, probs)}
        teachers = summarize(runs, fs.label_names)
        runs = _run_seeds(
            fs,
            model_cfg,
            loss_cfg,
            train_cfg,
            out,
            "student",
            seeds,
            model_name,
            resume,
            progress,
            soft,
            cdat,
        )
    spread = summarize(runs, fs.label_names)
    best_seed, selected = _keep_best(out, runs, "student" if distil else "seed")
    spread["selected"] = best_seed
    spread["ensemble"] = ensemble
    if distil:
        spread["distilled"] = {
            "weight": train_cfg.distill,
            "students": "student_*",
            "teachers": "seed_*",
            "note": DISTILLED_NOTE,
        }
        spread["teachers"] = teachers
    summary = {
        **selected,
        "over_seeds": spread,
        "baseline_context_free": context_free_baseline(fs, train_cfg.val_fraction, train_cfg.seed),
    }
    write_metrics(out, summary)
    return summary


def _keep_best(out: Path, runs: list[tuple[int, dict[str, Any]]], prefix: str) -> tuple[int, dict[str, Any]]:
    """The run directory itself holds the run with the best *validation* weighted-F1 (never picked on test): its
    seed and metrics."""
    best_seed, selected = max(runs, key=lambda r: r[1]["validation"]["weighted_f1"])
    for name in ("model.safetensors", "config.json", "training_curves.png", "confusion_matrix.png"):
        shutil.copy2(out / f"{prefix}_{best_seed}" / name, out / name)
    return best_seed, selected


def _run_seeds(
    fs: FeatureSet,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    out: Path,
    prefix: str,
    seeds: int,
    model_name: str,
    resume: bool,
    progress: bool,
    soft: dict[str, np.ndarray] | None = None,
    cdat: CDaTConfig | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    runs = []
    for k in range(seeds):
        cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed + k)
        if progress:
            print(f"--- {prefix} {cfg.seed} ({k + 1}/{seeds})")
        runs.append(
            (
                cfg.seed,
                train(
                    fs,
                    model_cfg,
                    loss_cfg,
                    cfg,
                    out / f"{prefix}_{cfg.seed}",
                    model_name,
                    resume,
                    progress,
                    soft,
                    cdat,
                ),
            )
        )
    return runs


def check_unique_ids(dialogues: list[Dialogue]) -> None:
    ids = [d.id for d in dialogues]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(
            "dialogue id",
            "unique ids in the train split (distillation keys its soft targets by id)",
            f"{dup!r} more than once",
            "Make the ids unique, or pass --distill 0",
        )


def load_seeds(out: Path, seeds: list[int], device: str = "cpu") -> list[ConversationModel]:
    from .checkpoint import load_checkpoint

    return [load_checkpoint(out / f"seed_{s}", map_location=device).model.eval() for s in seeds]


def ensemble_probabilities(
    models: list[ConversationModel], dialogues: list[Dialogue], device: str = "cpu"
) -> list[np.ndarray]:
    """Per dialogue, (n, C): the models' class probabilities (fused prediction) averaged, for every utterance."""
    from .train import dialogue_probs

    per_model = [dialogue_probs(m, dialogues, m.cfg.modalities, device=device) for m in models]
    return [np.mean(rows, axis=0) for rows in zip(*per_model)]


def seed_ensemble(
    fs: FeatureSet, models: list[ConversationModel], seeds: list[int], train_cfg: TrainConfig
) -> dict[str, Any]:
    """The seeds' averaged class probabilities, scored on validation and test (a reference number, not a model
    that is exported: the run directory holds the best-validation seed, or student when distilling)."""
    from .metrics import classification_metrics
    from .train import make_splits

    splits = make_splits(fs, train_cfg.val_fraction, train_cfg.seed)
    result: dict[str, Any] = {
        "seeds": seeds,
        "note": "mean of the seeds' probabilities; not the exported model",
    }
    # without an official dev split each seed validated on its own train fraction: no common validation split
    val = splits.val if splits.val_source == "dev" else []
    for name, dialogues in (("validation", val), ("test", splits.test)):
        if dialogues:
            y = np.concatenate([d.labels for d in dialogues])
            p = np.concatenate(ensemble_probabilities(models, dialogues, train_cfg.device))[y >= 0].argmax(-1)
            m = classification_metrics(y[y >= 0], p, fs.label_names)
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
        out[m] = {
            "C": r.best_c,
            "selection": r.selection,
            "validation_weighted_f1": r.dev_weighted_f1,
            "test_weighted_f1": r.test_weighted_f1,
            "test_accuracy": r.test_accuracy,
        }
    return out


def summarize(runs: list[tuple[int, dict[str, Any]]], label_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [s for s, _ in runs], "per_seed": {str(s): _brief(m) for s, m in runs}}
    for split in ("validation", "test"):
        if all(split in m for _, m in runs):
            block = {}
            for key in ("accuracy", "weighted_f1", "macro_f1"):
                vals = np.array([m[split][key] for _, m in runs])
                block[key] = {
                    "mean": float(vals.mean()),
                    "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                }
            block["per_class_f1"] = {
                n: float(np.mean([m[split]["per_class_f1"][n] for _, m in runs])) for n in label_names
            }
            block["confusion_matrix"] = np.sum(
                [m[split]["confusion_matrix"] for _, m in runs], axis=0
            ).tolist()
            out[split] = block
    return out


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "selected_epoch": m["selected_epoch"],
        **{
            split: {k: m[split][k] for k in ("accuracy", "weighted_f1")}
            for split in ("validation", "test")
            if split in m
        },
    }
