"""One training run from a request: everything `cmath-train` does, callable without its command line.

    metrics = run_training(TrainRequest(data="features/", seeds=3, out_dir=Path("runs/a")))

A run: check the request, load the data, pick the recipe (the data's own for CMATH, a preset for the rest) with
the request's overrides on top, optionally search it (tune.py), train one seed or several (train.py, seeds.py),
compare with the baselines, decide which model ships and fold the decision rule into it (shipped.py), write
RUN/metrics.json and print the summary (summary.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmath_runtime.errors import CmathError
from cmath_runtime.files import atomic_write_json

from .config import LossConfig, ModelConfig, Preset, TrainConfig, get_ablation
from .data.types import FeatureSet
from .recipe import Recipe

if TYPE_CHECKING:  # torch is imported when a run starts, not for `cmath-train --help`
    from .cdat import CDaTConfig


class RequestError(ValueError):
    """The request names something that does not exist or combines options that do not go together."""


class DataError(CmathError):
    """The request's data cannot be read (the message is the loader's)."""


@dataclass
class RecipeOverrides:
    """Values that replace the recipe's (None: the recipe's own)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    d: int | None = None  # hidden size
    dropout: float | None = None
    conv_kernel: int | None = None
    patience: int | None = None
    val_fraction: float | None = None
    class_weighted: bool | None = None
    distill: float | None = None  # with seeds >= 2: the weight of the seeds' ensemble as a teacher


@dataclass
class TrainRequest:
    """What to train, on what, how often, and what happens after (the options of `cmath-train`)."""

    data: str = "synthetic"  # "synthetic", a .pkl feature pickle or a features dir
    modalities: str | None = None  # letters of the data's modalities ("ta"); None: all
    model: str = "cmath"  # a registered trainable model
    preset: str | None = None  # None: CMATH's recipe chosen from the data; the other models' "default"
    ablation: str = "none"
    overrides: RecipeOverrides = field(default_factory=RecipeOverrides)
    causal: bool = False  # each utterance sees only the past
    cdat: str | None = None  # the CDaT add-on's confidence ("const" | "ce" | "confidnet"); None: no add-on
    cdat_alpha: float | None = None
    seed: int = 0
    seeds: int = 1  # > 1: that many seeds, mean +- std, the best on validation is the run's model
    tune_trials: int = 0  # > 0: an Optuna search on validation first, its best trial is trained
    tune_timeout: float | None = None
    decision_rule: bool = True  # per-class logit offsets folded into the shipped model when they earn it
    device: str = "cpu"
    out_dir: Path | None = None  # None: runs/<time>
    resume: bool = False
    progress: bool = True


@dataclass
class _Plan:
    """The configs a run trains with and the name of the recipe they came from."""

    model_cfg: ModelConfig
    loss_cfg: LossConfig
    train_cfg: TrainConfig
    recipe: Recipe | None  # chosen from the data; None when a preset was given
    recipe_name: str


def run_training(request: TrainRequest, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `request`; RUN/ holds the shipped model, metrics.json and the plots; returns the metrics.

    RequestError: a bad request (before any data is read); DataError: the data cannot be read; other
    CmathErrors: bad data or a failed step while training."""
    preset_name, preset, add_on = _check(request)
    t0 = time.perf_counter()
    fs, mods = _load(request, echo)
    plan = _plan(request, fs, mods, preset_name, preset)
    out = request.out_dir or Path(f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    _write_recipe(out, plan, echo)
    if request.progress:
        extras = f" + CDaT ({add_on.confidence}, alpha {add_on.alpha:g})" if add_on else ""
        echo(
            f"cmath-train: {request.model}{extras} on {request.data} ({''.join(mods)}), "
            f"recipe {plan.recipe_name}, ablation {request.ablation}, "
            f"{sum(len(v) for v in fs.splits.values())} conversations -> {out}"
        )
    if request.tune_trials:
        plan = _tuned(request, fs, plan, out, echo)
    metrics = _train(request, fs, plan, out, add_on)
    metrics["recipe"] = plan.recipe_name
    from .metrics import write_metrics
    from .shipped import finish_run
    from .summary import summary_text

    finish_run(fs, out, metrics, plan.train_cfg.val_fraction, plan.train_cfg.seed, request.decision_rule)
    write_metrics(out, metrics)
    echo(summary_text(metrics, out, time.perf_counter() - t0))
    return metrics


def _check(request: TrainRequest) -> tuple[str | None, Preset | None, CDaTConfig | None]:
    """The preset's name and recipe when the request fixes one (None: CMATH's, chosen from the data) and the CDaT
    add-on's config; RequestError for a request that cannot run."""
    from .cdat import CDaTConfig
    from .registry import model_names
    from .registry import preset as model_preset

    try:
        get_ablation(request.ablation)
        if request.model not in model_names():
            raise ValueError(f"model: expected one of {model_names()}, got {request.model!r}")
        name = request.preset
        if name is None and request.model != "cmath":
            name = "default"  # the data-chosen recipe is validated for CMATH only; baselines: their default
        # the model's own published recipe when it has one (SDT); None: CMATH's recipe is chosen from the data
        preset = model_preset(request.model, name) if name is not None else None
        if request.cdat_alpha is not None and request.cdat is None:
            raise ValueError("--cdat-alpha: give it with --cdat const|ce|confidnet")
        if request.cdat is not None and request.tune_trials:
            raise ValueError(
                "--tune searches the model's own recipe; it does not take --cdat (train without --tune)"
            )
        add_on = CDaTConfig(request.cdat, **_given(alpha=request.cdat_alpha)) if request.cdat else None
    except ValueError as e:
        raise RequestError(str(e)) from None
    return name, preset, add_on


def _load(request: TrainRequest, echo: Callable[[str], None]) -> tuple[FeatureSet, tuple[str, ...]]:
    """The request's data cut to its modalities, and those modalities as the request names them."""
    from .data import CAUSAL_SUBDIR, load_data

    try:
        fs = load_data(request.data, request.causal)
    except CmathError as e:
        raise DataError(str(e)) from None
    if fs.meta.get("path") and Path(fs.meta["path"]).name == CAUSAL_SUBDIR:
        echo(f"cmath-train: --causal reads the causal twin's features in {fs.meta['path']}")
    mods = select_modalities(request.modalities, fs.modalities)
    return fs.select(mods), mods


def select_modalities(text: str | None, available: tuple[str, ...]) -> tuple[str, ...]:
    """The modalities named by `text` ("ta", "t,a"; None or "": all of `available`); RequestError otherwise."""
    if not text:
        return available
    mods = tuple(m for m in text.replace(",", "") if m.strip())
    bad = [m for m in mods if m not in available]
    if bad or not mods:
        raise RequestError(
            f"expected letters from {''.join(available)!r} (the data's modalities), got {text!r}"
        )
    return mods


def _plan(
    request: TrainRequest,
    fs: FeatureSet,
    mods: tuple[str, ...],
    preset_name: str | None,
    preset: Preset | None,
) -> _Plan:
    """The configs: the recipe (the given preset, or one chosen from the data), the ablation, the overrides."""
    from .recipe import choose_recipe
    from .registry import loss_config, model_config

    model_over, loss_over = get_ablation(request.ablation)
    o = request.overrides
    recipe = None
    if preset is None:
        recipe = choose_recipe(fs)
        preset = recipe.preset()
    model_cfg = model_config(
        request.model,
        modalities=mods,
        feature_dims=fs.feature_dims,
        num_classes=len(fs.label_names),
        num_speakers=fs.num_speakers,
        causal=request.causal,
        **{**preset.model, **model_over, **_given(d=o.d, dropout=o.dropout, conv_kernel=o.conv_kernel)},
    )
    loss_cfg = loss_config(
        request.model, **{**preset.loss, **loss_over, **_given(class_weighted=o.class_weighted)}
    )
    given = _given(
        epochs=o.epochs,
        lr=o.lr,
        batch_size=o.batch_size,
        patience=o.patience,
        val_fraction=o.val_fraction,
        distill=o.distill,
    )
    train_cfg = TrainConfig(**{**preset.train, **given, "seed": request.seed, "device": request.device})
    if request.seeds < 2:  # nothing to distil from: the checkpoint records what training really did
        train_cfg = dataclasses.replace(train_cfg, distill=0.0)
    name = f"auto:{recipe.name}" if recipe is not None else str(preset_name)
    return _Plan(model_cfg, loss_cfg, train_cfg, recipe, name)


def _write_recipe(out: Path, plan: _Plan, echo: Callable[[str], None]) -> None:
    """RUN/recipe.json: the recipe and why it was chosen."""
    if plan.recipe is not None:
        echo(f"cmath-train: {plan.recipe.describe()}")
        atomic_write_json(out / "recipe.json", {"chosen_from_data": True, **plan.recipe.to_json()})
    else:
        atomic_write_json(
            out / "recipe.json",
            {
                "chosen_from_data": False,
                "name": plan.recipe_name,
                "reasons": [f"--preset {plan.recipe_name} given"],
            },
        )


def _tuned(
    request: TrainRequest, fs: FeatureSet, plan: _Plan, out: Path, echo: Callable[[str], None]
) -> _Plan:
    """The plan with the configs of the search's best trial (trials in RUN/tune)."""
    from .tune import tune

    model_cfg, loss_cfg, train_cfg = tune(
        fs,
        plan.model_cfg,
        plan.loss_cfg,
        plan.train_cfg,
        out / "tune",
        request.tune_trials,
        request.tune_timeout,
        request.model,
        progress=request.progress,
    )
    echo(f"cmath-train: best trial retrained with {request.seeds} seed(s) (trials in {out / 'tune'})")
    name = f"{plan.recipe_name} + tune ({out / 'tune' / 'best.json'})"
    return _Plan(model_cfg, loss_cfg, train_cfg, plan.recipe, name)


def _train(
    request: TrainRequest, fs: FeatureSet, plan: _Plan, out: Path, add_on: CDaTConfig | None
) -> dict[str, Any]:
    """Train one seed or `request.seeds` of them; their metrics."""
    from .seeds import train_seeds
    from .train import train

    cfgs = (plan.model_cfg, plan.loss_cfg, plan.train_cfg)
    if request.seeds > 1:
        return train_seeds(
            fs, *cfgs, out, request.seeds, request.model, request.resume, request.progress, add_on
        )
    return train(fs, *cfgs, out, request.model, request.resume, request.progress, cdat=add_on)


def _given(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}
