"""Classification metrics (scikit-learn), metrics.json (its one writer and schema) and the plots people would rather
look at.

metrics.json describes the model in its run folder: "model", "modalities", "parameters", "selected_epoch",
"validation_source", "history", and per split ("validation", "test") that model's scalar metrics. A run of
several seeds (cmath_train/seeds.py) holds its best-on-validation seed (or student), so its top level is that
model's, and "over_seeds" adds the spread: the seeds, the selected one, per-seed numbers, mean and std per split,
the seeds' ensemble, and with distillation the teachers' numbers. `cmath-train` adds what it measured around the
run (recipe, context-free baseline, the encoder's own classifier, what ships).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from cmath_runtime.files import atomic_open, atomic_write_json

METRICS = "metrics.json"
SPLITS = ("validation", "test")
RUN_KEYS = ("model", "modalities", "parameters", "selected_epoch", "validation_source", "history")
SCORES = ("accuracy", "weighted_f1", "macro_f1")


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> None:
    """Write OUT/metrics.json (atomically) after checking it has the schema above; ValueError names the field."""
    check_metrics(metrics)
    atomic_write_json(Path(out) / METRICS, metrics)


def check_metrics(metrics: dict[str, Any]) -> None:
    missing = [k for k in RUN_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics.json: expected the keys {list(RUN_KEYS)}, missing {missing}")
    for split in SPLITS:
        for key in SCORES if split in metrics else ():
            value = metrics[split].get(key)
            if not isinstance(value, float):
                raise ValueError(f"metrics.json {split}.{key}: expected a number, got {value!r}")
    spread = metrics.get("over_seeds")
    if spread is not None:
        for split in SPLITS:
            for key in SCORES if split in spread else ():
                if set(spread[split].get(key) or ()) != {"mean", "std"}:
                    raise ValueError(
                        f"metrics.json over_seeds.{split}.{key}: expected {{mean, std}}, "
                        f"got {spread[split].get(key)!r}"
                    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    labels = list(range(len(label_names)))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": {name: float(f) for name, f in zip(label_names, per_class)},
        "support": {name: int((y_true == i).sum()) for i, name in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "utterances": int(len(y_true)),
    }


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(history: list[dict[str, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train total loss")
    ax1.plot(epochs, [h["train_ce_x"] for h in history], label="train CE (fused)")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(
        epochs, [100 * h["val_weighted_f1"] for h in history], label="validation weighted-F1", color="C2"
    )
    ax2.plot(
        epochs, [100 * h["val_accuracy"] for h in history], label="validation accuracy", color="C3", ls="--"
    )
    best = max(history, key=lambda h: h["val_weighted_f1"])
    ax2.axvline(best["epoch"], color="gray", ls=":", label=f"selected (epoch {best['epoch']})")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("%"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.suptitle("training curves")
    _save_figure(fig, Path(path))


def plot_confusion(matrix: list[list[int]], label_names: list[str], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(label_names), 0.8 + 0.7 * len(label_names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    _save_figure(fig, Path(path))
