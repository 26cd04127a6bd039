"""Training with honest validation-based model selection.

Validation is the official dev split when the data has one, else a seeded fraction of train conversations.
The checkpoint with the best validation weighted-F1 is kept; test is evaluated once, for that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from cmath_runtime.errors import InputError
from cmath_runtime.files import atomic_write_json

from .cdat import CDaT, CDaTConfig
from .checkpoint import load_checkpoint, save_checkpoint
from .config import LossConfig, ModelConfig, TrainConfig, to_dict
from .data.batching import Batch, batches, class_weights, feature_stats
from .data.types import Dialogue, FeatureSet, split_validation
from .losses import ensemble_distillation
from .metrics import classification_metrics, plot_confusion, plot_curves, write_metrics
from .models.common import ConversationModel
from .registry import create_model

RESUME_DIR = "last"


@dataclass
class Splits:
    train: list[Dialogue]
    val: list[Dialogue]
    test: list[Dialogue]
    val_source: str  # "dev" or "train fraction 0.2 (seed 0)"


def make_splits(fs: FeatureSet, val_fraction: float, seed: int) -> Splits:
    if "dev" in fs.splits and fs.splits["dev"]:
        return Splits(fs.splits["train"], fs.splits["dev"], fs.splits.get("test", []), "dev")
    train, val = split_validation(fs.splits["train"], val_fraction, seed)
    return Splits(train, val, fs.splits.get("test", []), f"train fraction {val_fraction} (seed {seed})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict(
    model: torch.nn.Module,
    dialogues: list[Dialogue],
    modalities: tuple[str, ...],
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) over every labelled real utterance, fused prediction Y^_x."""
    y, probs = predict_proba(model, dialogues, modalities, batch_size, device)
    return y, probs.argmax(-1)


def predict_proba(
    model: torch.nn.Module,
    dialogues: list[Dialogue],
    modalities: tuple[str, ...],
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, class probabilities) over every labelled real utterance, fused prediction Y^_x."""
    y = np.concatenate([d.labels for d in dialogues])
    probs = np.concatenate(dialogue_probs(model, dialogues, modalities, batch_size, device))
    return y[y >= 0], probs[y >= 0]


@torch.no_grad()
def dialogue_probs(
    model: torch.nn.Module,
    dialogues: list[Dialogue],
    modalities: tuple[str, ...],
    batch_size: int = 16,
    device: str = "cpu",
) -> list[np.ndarray]:
    """Per dialogue, (n, C): the class probabilities of the fused prediction Y^_x for every utterance (batched)."""
    model.eval()
    out = []
    for batch in batches(dialogues, modalities, batch_size, shuffle=False):
        batch = batch.to(device)
        probs = (
            torch.softmax(model(batch.features, batch.speaker, batch.mask).logits.float(), -1).cpu().numpy()
        )
        out += [p[:n] for p, n in zip(probs, batch.mask.sum(1).tolist())]  # real rows first, padding after
    return out


def train_step(
    model: ConversationModel,
    batch: Batch,
    loss_cfg: LossConfig,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    weight: torch.Tensor | None,
    distill: float = 0.0,
) -> dict[str, float]:
    model.train()
    out = model(batch.features, batch.speaker, batch.mask)
    terms = model.loss(out, batch.labels, batch.mask, loss_cfg, weight)
    if distill > 0 and batch.soft is not None:  # the seeds' ensemble as a teacher (seeds.py)
        terms["distill"] = ensemble_distillation(out.logits, batch.soft, batch.mask & (batch.labels >= 0))
        terms["total"] = terms["total"] + distill * terms["distill"]
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def train(
    fs: FeatureSet,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    model_name: str = "cmath",
    resume: bool = False,
    progress: bool = True,
    soft_targets: dict[str, np.ndarray] | None = None,
    cdat: CDaTConfig | None = None,
) -> dict[str, Any]:
    """Train, keep the best-on-validation checkpoint in out_dir, write metrics.json and plots; return metrics.

    `soft_targets`: dialogue id -> (n, C) class probabilities of a teacher ensemble for the train dialogues
    (seeds.py); used with weight train_cfg.distill. `cdat`: wrap the model in the CDaT add-on (cdat.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _start(fs, model_name, model_cfg, loss_cfg, train_cfg, out, progress, soft_targets, cdat)
    state = _initial_state(
        run, _resume_recipe(model_name, model_cfg, loss_cfg, train_cfg, run.splits, cdat), resume
    )
    start = time.perf_counter()
    for epoch in range(state["epoch"] + 1, train_cfg.epochs + 1):
        if state["bad_epochs"] >= train_cfg.patience:
            break
        record, val = _epoch(run, epoch, start)
        state["history"].append(record)
        improved = val["weighted_f1"] > state["best"]
        if improved:
            state.update(best=val["weighted_f1"], best_epoch=epoch, bad_epochs=0)
            _save_selected(run, epoch, val["weighted_f1"])
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        _save_resume(out / RESUME_DIR, run.model, run.optimizer, state, run.ema)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  val acc {100 * val['accuracy']:.2f}  "
                f"val wF1 {100 * val['weighted_f1']:.2f}{'  *' if improved else ''}"
            )

    return evaluate_run(out, fs, run.splits, state["history"], train_cfg.device)


@dataclass
class _Training:
    """What one training run works with."""

    fs: FeatureSet
    splits: Splits
    model_name: str
    model_cfg: ModelConfig
    loss_cfg: LossConfig
    train_cfg: TrainConfig
    out: Path
    progress: bool
    model: ConversationModel
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    weight: torch.Tensor | None  # class weights of the cross-entropies
    soft: list[np.ndarray] | None  # the teachers' probabilities per train dialogue (distillation)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights validated and kept: with EMA, the averaged ones."""
        return self.model if self.ema is None else self.ema.module


def _start(
    fs: FeatureSet,
    model_name: str,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    out: Path,
    progress: bool,
    soft_targets: dict[str, np.ndarray] | None,
    cdat: CDaTConfig | None,
) -> _Training:
    """The splits, the seeded fresh model with the train split's input statistics, its optimizer and EMA."""
    splits = make_splits(fs, train_cfg.val_fraction, train_cfg.seed)
    mods, device = model_cfg.modalities, train_cfg.device
    seed_everything(train_cfg.seed)
    model = create_model(model_name, model_cfg)
    if cdat is not None:
        model = CDaT(model, cdat)
    mean, std = feature_stats(splits.train, mods)
    model.set_input_stats(mean, std)
    model.to(device)
    # AdamW: decoupled weight decay (identical to Adam when weight_decay is 0).
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    ema = make_ema(model, train_cfg.ema_decay, train_cfg.ema_warmup)
    weight = (
        class_weights(splits.train, model_cfg.num_classes).to(device) if loss_cfg.class_weighted else None
    )
    soft = [soft_targets[d.id] for d in splits.train] if soft_targets and train_cfg.distill > 0 else None
    return _Training(
        fs,
        splits,
        model_name,
        model_cfg,
        loss_cfg,
        train_cfg,
        out,
        progress,
        model,
        optimizer,
        ema,
        weight,
        soft,
    )


def _initial_state(run: _Training, recipe: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The training state (epoch, best, history, ...): fresh, or with `resume` the interrupted run's, after its
    recipe is checked against this one and its weights, optimizer and EMA are loaded."""
    state: dict[str, Any] = {
        "epoch": 0,
        "best": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
        "recipe": recipe,
    }
    out = run.out
    if resume and (out / RESUME_DIR / "state.json").is_file():
        saved = json.loads((out / RESUME_DIR / "state.json").read_text())
        _check_same_recipe(
            out, saved.get("recipe") or {}, recipe
        )  # before any weight is loaded into this model
        _load_resume(out / RESUME_DIR, run.model, run.optimizer, run.ema)
        state = {**saved, "recipe": recipe}
        if run.progress:
            print(f"resuming {out} after epoch {state['epoch']}")
    return state


def _epoch(run: _Training, epoch: int, start: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One pass over the train split, then validation: the epoch's history record and validation metrics."""
    cfg, mods, device = run.train_cfg, run.model_cfg.modalities, run.train_cfg.device
    seed_everything(cfg.seed * 1000 + epoch)  # resumable: each epoch's randomness depends on it alone
    sums: dict[str, float] = {}
    n_batches = (len(run.splits.train) + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(
        batches(run.splits.train, mods, cfg.batch_size, True, cfg.seed * 1000 + epoch, run.soft),
        total=n_batches,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not run.progress,
        leave=False,
    )
    for batch in bar:
        terms = train_step(
            run.model,
            batch.to(device),
            run.loss_cfg,
            run.optimizer,
            cfg.grad_clip,
            run.weight,
            cfg.distill if run.soft is not None else 0.0,
        )
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{terms['total']:.3f}")
    y, p = predict(run.evaluated, run.splits.val, mods, device=device)
    val = classification_metrics(y, p, run.fs.label_names)
    record = {
        "epoch": epoch,
        "train_loss": sums["total"] / n_batches,
        "train_ce_x": sums["ce_x"] / n_batches,
        **{f"train_{k}": v / n_batches for k, v in sums.items() if k not in ("total", "ce_x")},
        "val_accuracy": val["accuracy"],
        "val_weighted_f1": val["weighted_f1"],
        "seconds": time.perf_counter() - start,
    }
    return record, val


def _save_selected(run: _Training, epoch: int, weighted_f1: float) -> None:
    """The checkpoint of the epoch validation selects, in the run folder."""
    data = {**run.fs.meta, "modalities": list(run.model_cfg.modalities), "validation": run.splits.val_source}
    selected = {"epoch": epoch, "metric": "validation weighted_f1", "value": weighted_f1}
    save_checkpoint(
        run.out,
        run.evaluated,
        run.model_name,
        run.model_cfg,
        run.loss_cfg,
        run.train_cfg,
        run.fs.label_names,
        {"data": data, "selected": selected},
    )


def evaluate_run(
    out: Path, fs: FeatureSet, splits: Splits, history: list[dict], device: str
) -> dict[str, Any]:
    """Evaluate the selected checkpoint once on validation and test; write metrics.json and the plots."""
    ckpt = load_checkpoint(out, map_location=device)
    mods = ckpt.model_cfg.modalities
    metrics: dict[str, Any] = {
        "selected_epoch": ckpt.extra["selected"]["epoch"],
        "validation_source": splits.val_source,
        "model": ckpt.model_name,
        "modalities": list(mods),
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
        "history": history,
    }
    for name, dialogues in (("validation", splits.val), ("test", splits.test)):
        if dialogues:
            metrics[name] = classification_metrics(
                *predict(ckpt.model, dialogues, mods, device=device), fs.label_names
            )
    write_metrics(out, metrics)
    plot_curves(history, out / "training_curves.png")
    split = "test" if "test" in metrics else "validation"
    plot_confusion(
        metrics[split]["confusion_matrix"],
        fs.label_names,
        out / "confusion_matrix.png",
        f"{split} confusion (selected epoch {metrics['selected_epoch']})",
    )
    return metrics


def make_ema(model: torch.nn.Module, decay: float, warmup: float = 10.0) -> AveragedModel | None:
    """Exponential moving average of the weights (updated after every step), or None when decay is 0.

    Averaging the weights along the trajectory smooths the epoch-to-epoch noise that early stopping on a small
    validation split would otherwise pick up; buffers (the standardisation statistics) are copied, not averaged.
    The first update copies the weights; the one after n updates uses min(decay, (1 + n) / (warmup + n)), so until
    the decay cap is reached the average spans about the last n / (warmup - 1) steps.
    """
    if decay <= 0:
        return None
    if not decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {decay}")
    if not warmup > 1:
        raise ValueError(f"ema_warmup: expected a number > 1, got {warmup}")

    def avg_fn(
        averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int
    ) -> torch.Tensor:
        # warm-up (TensorFlow's num_updates rule): early on the average follows the weights, so a short run
        # (a small data set: few steps) is not dominated by the random initialisation
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (warmup + n))
        return d * averaged + (1.0 - d) * current

    return AveragedModel(model, avg_fn=avg_fn, use_buffers=False)


def _save_resume(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    ema: AveragedModel | None = None,
) -> None:
    from cmath_runtime.files import atomic_open

    path.mkdir(parents=True, exist_ok=True)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if ema is not None:
        saved["ema"] = ema.state_dict()
    with atomic_open(path / "training.pt", "wb") as f:
        torch.save(saved, f)
    atomic_write_json(path / "state.json", state)


def _load_resume(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: AveragedModel | None = None
) -> None:
    """The interrupted run's weights and optimizer state (its state.json is read by the caller)."""
    saved = torch.load(path / "training.pt", map_location="cpu", weights_only=True)  # restricted unpickler
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])


# Options a resumed run may change: how long it goes on, and where it runs.
RESUMABLE_CHANGES = ("train.epochs", "train.patience", "train.device")


def _resume_recipe(
    model_name: str,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    splits: Splits,
    cdat: CDaTConfig | None = None,
) -> dict[str, Any]:
    """Everything that shapes the training trajectory, flat ("train.distill": 1.0), for the resume check: the
    model, the configs and the data (a digest of the train and validation dialogue ids)."""
    ids = [[d.id for d in splits.train], [d.id for d in splits.val]]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    flat: dict[str, Any] = {
        "model_name": model_name,
        "data.dialogues": f"{len(ids[0])} train / {len(ids[1])} validation ({digest})",
    }
    for part, cfg in config_summary(model_cfg, loss_cfg, train_cfg).items():
        flat.update({f"{part}.{k}": v for k, v in cfg.items() if f"{part}.{k}" not in RESUMABLE_CHANGES})
    flat["cdat"] = to_dict(cdat) if cdat is not None else None
    return json.loads(json.dumps(flat))  # as state.json stores it (tuples become lists)


def _check_same_recipe(out: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """--resume continues the interrupted run; with other options it would silently mix two recipes, so every
    recorded setting must match (a setting only one side records is a mismatch too)."""
    missing = "(not recorded)"
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, missing) != current.get(key, missing):
            raise InputError(
                key,
                f"{saved.get(key, missing)!r} (what the interrupted run in {out} used)",
                repr(current.get(key, missing)),
                "--resume continues that run: give the same options, or train into a new --out",
            )


def config_summary(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": to_dict(model_cfg), "loss": to_dict(loss_cfg), "train": to_dict(train_cfg)}
