"""`cmath-train --tune N`: an Optuna search on the validation split only, then the best trial's configs.

The test split is removed from the data before the first trial, so no trial can see it. Validation is the
official dev split when the data has one, else the seeded fraction of train conversations that training uses.
Every trial is written to RUN/tune/trials.jsonl as it finishes and to trials.csv / best.json at the end.
The search space is SEARCH_SPACE below, and nowhere else.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from cmath_runtime.files import atomic_open, atomic_write_json

from .config import LossConfig, ModelConfig, TrainConfig
from .data.types import FeatureSet

# name -> (config section, kind, choices or (low, high)); kinds: "cat", "float", "log".
SEARCH_SPACE: dict[str, tuple[str, str, Any]] = {
    "d": ("model", "cat", [64, 128, 256]),
    "dropout": ("model", "float", (0.1, 0.5)),
    "gamma_mse": ("loss", "cat", [0.0, 0.5, 1.0]),
    "gamma_kl": ("loss", "cat", [0.0, 0.5, 1.0, 1.5]),
    "lr": ("train", "log", (1e-4, 2e-3)),
    "weight_decay": ("train", "cat", [0.0, 0.01, 0.05, 0.1]),
    "ema_decay": ("train", "cat", [0.0, 0.99, 0.995, 0.998]),
    "batch_size": ("train", "cat", [4, 8, 16]),
}


def suggest(trial: Any, space: dict[str, tuple[str, str, Any]] = SEARCH_SPACE) -> dict[str, dict[str, Any]]:
    """One point of the search space, grouped by config section."""
    params: dict[str, dict[str, Any]] = {"model": {}, "loss": {}, "train": {}}
    for name, (section, kind, arg) in space.items():
        if kind == "cat":
            value = trial.suggest_categorical(name, arg)
        elif kind in ("float", "log"):
            value = trial.suggest_float(name, arg[0], arg[1], log=kind == "log")
        else:
            raise ValueError(f"SEARCH_SPACE[{name!r}]: expected kind 'cat', 'float' or 'log', got {kind!r}")
        params[section][name] = value
    return params


def starting_point(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    space: dict[str, tuple[str, str, Any]] = SEARCH_SPACE,
) -> dict[str, Any]:
    """The given configs' values of the search space's parameters (those inside the space): the search's trial 0,
    so tuning only replaces the recipe it started from when a trial beats it on validation."""
    cfgs = {"model": model_cfg, "loss": loss_cfg, "train": train_cfg}
    point = {}
    for name, (section, kind, arg) in space.items():
        if not hasattr(cfgs[section], name):
            continue
        value = getattr(cfgs[section], name)
        if (value in arg) if kind == "cat" else (arg[0] <= value <= arg[1]):
            point[name] = value
    return point


def apply(
    model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig, params: dict[str, dict[str, Any]]
) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    model = _replace(model_cfg, params.get("model", {}))
    if model.d % model.heads:  # keep the head count valid for every d in the space
        model = dataclasses.replace(model, heads=math.gcd(model.d, model.heads))
    return model, _replace(loss_cfg, params.get("loss", {})), _replace(train_cfg, params.get("train", {}))


def _replace(cfg: Any, values: dict[str, Any]) -> Any:
    """cfg with the values of the fields it has (a model without distillation has no g1/g2: they are skipped)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})


def tune(
    fs: FeatureSet,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    n_trials: int,
    timeout: float | None = None,
    model_name: str = "cmath",
    progress: bool = True,
) -> tuple[ModelConfig, LossConfig, TrainConfig]:
    """Search on validation; return the configs of the best trial (the given configs filled in with its values)."""
    try:
        import optuna
    except ImportError:  # pragma: no cover - optuna is in the train extra
        raise RuntimeError("--tune needs optuna: pip install 'cmath[train]'") from None
    from .train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    search_fs = FeatureSet(
        fs.label_names,
        fs.feature_dims,
        fs.num_speakers,
        {k: v for k, v in fs.splits.items() if k != "test"},
        dict(fs.meta),
    )  # test never seen
    log_path = out / "trials.jsonl"
    log_path.write_text("")
    records: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        params = suggest(trial)
        m, lc, tc = apply(model_cfg, loss_cfg, train_cfg, params)
        t0 = time.perf_counter()
        metrics = train(search_fs, m, lc, tc, out / f"trial_{trial.number:03d}", model_name, progress=False)
        value = metrics["validation"]["weighted_f1"]
        rec = {
            "trial": trial.number,
            "validation_weighted_f1": value,
            "selected_epoch": metrics["selected_epoch"],
            "seconds": round(time.perf_counter() - t0, 2),
            **{k: v for sec in params.values() for k, v in sec.items()},
        }
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if progress:
            print(f"trial {trial.number}: validation weighted-F1 {100 * value:.2f}  {params}")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=train_cfg.seed))
    study.enqueue_trial(
        starting_point(model_cfg, loss_cfg, train_cfg)
    )  # trial 0: the recipe the search starts from
    study.optimize(objective, n_trials=n_trials, timeout=timeout)
    if not records:
        raise RuntimeError("--tune: no trial finished inside the time budget")
    return apply(model_cfg, loss_cfg, train_cfg, _write_results(out, records))


def _write_results(out: Path, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """OUT/trials.csv and OUT/best.json; the best trial's parameters per config section."""
    best = max(records, key=lambda r: r["validation_weighted_f1"])
    keys = list(records[0])
    with atomic_open(out / "trials.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    best_params = {
        sec: {k: best[k] for k in SEARCH_SPACE if SEARCH_SPACE[k][0] == sec}
        for sec in ("model", "loss", "train")
    }
    atomic_write_json(
        out / "best.json",
        {
            "selected_on": "validation weighted-F1 (test split removed during the search)",
            "trials": len(records),
            "best_trial": best["trial"],
            "validation_weighted_f1": best["validation_weighted_f1"],
            "params": best_params,
            "search_space": {k: list(v) for k, v in SEARCH_SPACE.items()},
        },
    )
    return best_params
