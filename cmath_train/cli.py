"""`cmath-train`: train CMATH (or a registered baseline) on synthetic data, a feature pickle or a features dir."""

from __future__ import annotations

import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from cmath_runtime.errors import CmathError
from cmath_runtime.files import atomic_write_json

from .config import TrainConfig, get_ablation


def parse_modalities(text: str | None, available: tuple[str, ...]) -> tuple[str, ...]:
    if not text:
        return available
    mods = tuple(m for m in text.replace(",", "") if m.strip())
    bad = [m for m in mods if m not in available]
    if bad or not mods:
        raise click.BadParameter(
            f"expected letters from {''.join(available)!r} (the data's modalities), got {text!r}"
        )
    return mods


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    default="synthetic",
    show_default=True,
    help="'synthetic', a .pkl feature pickle, or a features dir.",
)
@click.option(
    "--modalities", default=None, help="Subset of the data's modalities, e.g. 'tav', 'ta', 't'. Default: all."
)
@click.option(
    "--preset",
    default=None,
    help="default | iemocap | meld (paper settings). "
    "Default: a recipe chosen from the data (modalities, feature sizes, data size), printed with the reasons.",
)
@click.option("--model", "model_name", default="cmath", show_default=True, help="Registered model name.")
@click.option(
    "--ablation", default="none", show_default=True, help="none | wo_mr | wo_cmat | wo_lld | wo_hld | wo_hd."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Max epochs (default from TrainConfig: 30)."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Adam learning rate (default from preset).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Conversations per batch (default from preset).",
)
@click.option(
    "--d", "hidden", type=click.IntRange(min=1), default=None, help="Hidden size d (default from preset)."
)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option(
    "--conv-kernel",
    type=click.IntRange(min=1),
    default=None,
    help="Kernel k_m of the reconstruction convolutions (1-2).",
)
@click.option(
    "--patience", type=click.IntRange(min=1), default=None, help="Early-stopping patience in epochs."
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction of train when there is no dev split.",
)
@click.option(
    "--class-weighted/--no-class-weighted", default=None, help="Inverse-frequency class weights in CE."
)
@click.option(
    "--cdat",
    "cdat",
    type=click.Choice(["const", "ce", "confidnet"]),
    default=None,
    help="Train inside the CDaT add-on (cmath_train/cdat.py, any model): transfer encoders G_m before the "
    "model and alpha * the dynamic PKT loss between modalities, w_m from a constant (plain PKT), the "
    "cross-entropy of masking m, or ConfidNet. The checkpoint records it; the export includes G_m.",
)
@click.option(
    "--cdat-alpha",
    type=click.FloatRange(min=0),
    default=None,
    help="With --cdat: alpha, the weight of the transfer loss (default: cdat.CDaTConfig).",
)
@click.option(
    "--causal/--bidirectional",
    default=False,
    show_default=True,
    help="Online variant: each utterance sees only the past.",
)
@click.option(
    "--decision-rule/--no-decision-rule",
    default=True,
    show_default=True,
    help="Per-class logit offsets for weighted-F1, chosen on validation and folded into the shipped model when "
    "they earn it on validation halves (cmath_train/decision.py).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train this many seeds; report mean +- std.",
)
@click.option(
    "--distill",
    type=click.FloatRange(min=0),
    default=None,
    help="With --seeds N >= 2: train N students on labels + this weight * KL(the seeds' averaged "
    "probabilities || student); they are the result (0: off). Default from the recipe.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (default runs/<time>).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--tune",
    "tune_trials",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Optuna search with this many trials on the validation split (never test), then the best "
    "trial retrained with --seeds. Search space: cmath_train/tune.py.",
)
@click.option(
    "--tune-timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="Time budget of the search in seconds (stops starting trials after it).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(**opts: object) -> None:
    """Train a model; keep the checkpoint with the best validation weighted-F1."""
    try:
        run(**opts)
    except CmathError as e:
        click.echo(f"cmath-train: error: {e}", err=True)
        sys.exit(2)


def run(
    data: str,
    modalities: str | None,
    preset: str | None,
    model_name: str,
    ablation: str,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    hidden: int | None,
    dropout: float | None,
    conv_kernel: int | None,
    patience: int | None,
    val_fraction: float | None,
    class_weighted: bool | None,
    causal: bool,
    seed: int,
    seeds: int,
    device: str,
    out_dir: str | None,
    resume: bool,
    quiet: bool,
    tune_trials: int = 0,
    tune_timeout: float | None = None,
    distill: float | None = None,
    cdat: str | None = None,
    cdat_alpha: float | None = None,
    decision_rule: bool = True,
) -> dict:
    from .cdat import CDaTConfig
    from .data import CAUSAL_SUBDIR, load_data
    from .metrics import write_metrics
    from .recipe import choose_recipe
    from .registry import loss_config, model_config, model_names
    from .registry import preset as model_preset
    from .seeds import train_seeds
    from .shipped import finish_run
    from .train import train

    try:
        model_over, loss_over = get_ablation(ablation)
        if model_name not in model_names():
            raise ValueError(f"model: expected one of {model_names()}, got {model_name!r}")
        if preset is None and model_name != "cmath":
            preset = "default"  # the data-chosen recipe is validated for CMATH only; baselines: their default
        # the model's own published recipe when it has one (SDT); None: CMATH's recipe is chosen from the data below
        p = model_preset(model_name, preset) if preset is not None else None
        if cdat_alpha is not None and cdat is None:
            raise ValueError("--cdat-alpha: give it with --cdat const|ce|confidnet")
        if cdat is not None and tune_trials:
            raise ValueError(
                "--tune searches the model's own recipe; it does not take --cdat (train without --tune)"
            )
        add_on = CDaTConfig(cdat, **_given(alpha=cdat_alpha)) if cdat else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    t0 = time.perf_counter()
    try:
        fs = load_data(data, causal)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    if fs.meta.get("path") and Path(fs.meta["path"]).name == CAUSAL_SUBDIR:
        click.echo(f"cmath-train: --causal reads the causal twin's features in {fs.meta['path']}")
    mods = parse_modalities(modalities, fs.modalities)
    fs = fs.select(mods)
    recipe = None
    if p is None:
        recipe = choose_recipe(fs)
        p = recipe.preset()
    model_cfg = model_config(
        model_name,
        modalities=mods,
        feature_dims=fs.feature_dims,
        num_classes=len(fs.label_names),
        num_speakers=fs.num_speakers,
        causal=causal,
        **{**p.model, **model_over, **_given(d=hidden, dropout=dropout, conv_kernel=conv_kernel)},
    )
    loss_cfg = loss_config(
        model_name,
        **{
            **p.loss,
            **loss_over,
            **_given(class_weighted=class_weighted),
        },
    )
    train_cfg = TrainConfig(
        **{
            **p.train,
            **_given(
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                patience=patience,
                val_fraction=val_fraction,
                distill=distill,
            ),
            "seed": seed,
            "device": device,
        }
    )
    if seeds < 2:  # nothing to distil from: the checkpoint records what training really did
        train_cfg = dataclasses.replace(train_cfg, distill=0.0)
    out = Path(out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    recipe_name = preset if recipe is None else f"auto:{recipe.name}"
    if recipe is not None:
        click.echo(f"cmath-train: {recipe.describe()}")
        atomic_write_json(out / "recipe.json", {"chosen_from_data": True, **recipe.to_json()})
    else:
        atomic_write_json(
            out / "recipe.json",
            {"chosen_from_data": False, "name": preset, "reasons": [f"--preset {preset} given"]},
        )
    if not quiet:
        extras = f" + CDaT ({add_on.confidence}, alpha {add_on.alpha:g})" if add_on else ""
        click.echo(
            f"cmath-train: {model_name}{extras} on {data} ({''.join(mods)}), "
            f"recipe {recipe_name}, ablation {ablation}, {sum(len(v) for v in fs.splits.values())} conversations -> {out}"
        )
    if tune_trials:
        from .tune import tune

        model_cfg, loss_cfg, train_cfg = tune(
            fs,
            model_cfg,
            loss_cfg,
            train_cfg,
            out / "tune",
            tune_trials,
            tune_timeout,
            model_name,
            progress=not quiet,
        )
        click.echo(f"cmath-train: best trial retrained with {seeds} seed(s) (trials in {out / 'tune'})")
        recipe_name += f" + tune ({out / 'tune' / 'best.json'})"
    if seeds > 1:
        metrics = train_seeds(
            fs, model_cfg, loss_cfg, train_cfg, out, seeds, model_name, resume, not quiet, add_on
        )
    else:
        metrics = train(fs, model_cfg, loss_cfg, train_cfg, out, model_name, resume, not quiet, cdat=add_on)
    metrics["recipe"] = recipe_name
    finish_run(fs, out, metrics, train_cfg.val_fraction, train_cfg.seed, decision_rule)
    write_metrics(out, metrics)
    click.echo(summary_text(metrics, out, time.perf_counter() - t0))
    return metrics


def _given(**kw: object) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def summary_text(metrics: dict, out: Path, seconds: float) -> str:
    lines = [f"run: {out.resolve()}  ({seconds:.0f} s)"]
    spread = metrics.get("over_seeds") or {}
    if spread:
        lines.append(
            f"the run's model: seed {spread['selected']} of {spread['seeds']}, selected on validation"
        )
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            lines.append(
                f"{split:10s} accuracy {100 * m['accuracy']:.2f}  weighted-F1 {100 * m['weighted_f1']:.2f}"
            )
    if spread:
        for split in ("validation", "test"):
            if split in spread:
                s = spread[split]
                lines.append(
                    f"{split:10s} over seeds: accuracy {100 * s['accuracy']['mean']:.2f} +- "
                    f"{100 * s['accuracy']['std']:.2f}  weighted-F1 {100 * s['weighted_f1']['mean']:.2f} +- "
                    f"{100 * s['weighted_f1']['std']:.2f}"
                )
    if "distilled" in spread:
        t = spread["teachers"]
        parts = [
            f"{split} weighted-F1 {100 * t[split]['weighted_f1']['mean']:.2f} +- {100 * t[split]['weighted_f1']['std']:.2f}"
            for split in ("validation", "test")
            if split in t
        ]
        lines.append(
            f"(the students are distilled from the seeds' ensemble, weight {spread['distilled']['weight']:g}; "
            "the seeds themselves: " + "  ".join(parts) + ")"
        )
    ens = spread.get("ensemble", {})
    if "test" in ens or "validation" in ens:
        parts = [
            f"{split} weighted-F1 {100 * ens[split]['weighted_f1']:.2f}"
            for split in ("validation", "test")
            if split in ens
        ]
        lines.append(
            f"ensemble of the {len(ens['seeds'])} seeds (averaged probabilities, not the exported model): "
            + "  ".join(parts)
        )
    for m, b in metrics.get("baseline_context_free", {}).items():
        test = (
            f"; test accuracy {100 * b['test_accuracy']:.2f}  weighted-F1 {100 * b['test_weighted_f1']:.2f}"
            if b.get("test_weighted_f1") is not None
            else ""
        )
        lines.append(
            f"context-free logistic regression ({m}): validation weighted-F1 "
            f"{100 * b['validation_weighted_f1']:.2f}{test}"
        )
    enc = metrics.get("encoder_classifier")
    if enc:
        from .shipped import CONTEXT_MODEL_DIR

        parts = [
            f"{split} weighted-F1 {100 * enc[f'{split}_weighted_f1']:.2f}"
            for split in ("validation", "test")
            if f"{split}_weighted_f1" in enc
        ]
        lines.append("the fine-tuned encoder's own classifier (no context model): " + "  ".join(parts))
        lines.append(
            "shipped: the trained model (it beats the encoder's classifier on validation)"
            if metrics.get("shipped") == "cmath"
            else "shipped: the encoder's own classifier, better on validation than the trained model (context adds "
            f"nothing here as trained): {out.resolve()} holds it (model encoder_head), the trained model is in "
            f"{(out / CONTEXT_MODEL_DIR).resolve()}"
        )
    rule = metrics.get("decision_rule")
    if rule:
        test = (
            f"; test {100 * rule['test_weighted_f1_before']:.2f} -> {100 * rule['test_weighted_f1_after']:.2f}"
            if rule.get("test_weighted_f1_after") is not None
            else ""
        )
        cross = rule.get("cross_fitted") or {}
        lines.append(
            f"decision rule: {'offsets folded into the shipped model' if rule['applied'] else 'none'} ("
            + (
                f"validation halves {100 * cross['before']:.2f} -> {100 * cross['after']:.2f}"
                if cross
                else "validation too small to cut in halves"
            )
            + f"); the shipped model's weighted-F1: validation {100 * rule['validation_weighted_f1_before']:.2f} -> "
            f"{100 * rule['validation_weighted_f1_after']:.2f}{test}"
        )
    lines.extend(baseline_warnings(metrics))
    return "\n".join(lines)


def baseline_warnings(metrics: dict) -> list[str]:
    """A warning when the selected model is below the context-free baseline on validation (the split it was chosen on)."""
    val = metrics.get("validation", {}).get("weighted_f1")
    if val is None:
        return []
    out = []
    for m, b in metrics.get("baseline_context_free", {}).items():
        if b.get("validation_weighted_f1") is not None and val < b["validation_weighted_f1"]:
            out.append(
                f"WARNING: the selected model's validation weighted-F1 {100 * val:.2f} is below the context-free "
                f"logistic regression on {m!r} ({100 * b['validation_weighted_f1']:.2f}): conversation context "
                "does not help here as trained; try --tune N or another --preset"
            )
    return out


if __name__ == "__main__":
    main()
