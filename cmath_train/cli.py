"""`cmath-train`: train CMATH (or a registered baseline) on synthetic data, a feature pickle or a features dir."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import click

from cmath_runtime.errors import CmathError

from .config import TrainConfig, get_ablation


def parse_modalities(text: str | None, available: tuple[str, ...]) -> tuple[str, ...]:
    if not text:
        return available
    mods = tuple(m for m in text.replace(",", "") if m.strip())
    bad = [m for m in mods if m not in available]
    if bad or not mods:
        raise click.BadParameter(f"expected letters from {''.join(available)!r} (the data's modalities), got {text!r}")
    return mods


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default="synthetic", show_default=True, help="'synthetic', a .pkl feature pickle, or a features dir.")
@click.option("--modalities", default=None, help="Subset of the data's modalities, e.g. 'tav', 'ta', 't'. Default: all.")
@click.option("--preset", default="default", show_default=True, help="default | iemocap | meld (paper settings) | meld_text.")
@click.option("--model", "model_name", default="cmath", show_default=True, help="Registered model name.")
@click.option("--ablation", default="none", show_default=True, help="none | wo_mr | wo_cmat | wo_lld | wo_hld | wo_hd.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Max epochs (default from TrainConfig: 30).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate (default from preset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Conversations per batch (default from preset).")
@click.option("--d", "hidden", type=click.IntRange(min=1), default=None, help="Hidden size d (default from preset).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option("--conv-kernel", type=click.IntRange(min=1), default=None, help="Kernel k_m of the reconstruction convolutions (1-2).")
@click.option("--patience", type=click.IntRange(min=1), default=None, help="Early-stopping patience in epochs.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="Validation fraction of train when there is no dev split.")
@click.option("--class-weighted/--no-class-weighted", default=None, help="Inverse-frequency class weights in CE.")
@click.option("--confidence-kd", "--cdat", "cdat", is_flag=True,
              help="Confidence-gated prediction-level KD: per utterance, the more confident modality's prediction "
              "teaches the less confident one (any model; LossConfig.cdat*). Not the CDaT paper's feature-level "
              "transfer; --cdat is a kept alias.")
@click.option("--causal/--bidirectional", default=False, show_default=True, help="Online variant: each utterance sees only the past.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True, help="Train this many seeds; report mean +- std.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<time>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(**opts: object) -> None:
    """Train a model; keep the checkpoint with the best validation weighted-F1."""
    try:
        run(**opts)
    except CmathError as e:
        click.echo(f"cmath-train: error: {e}", err=True)
        sys.exit(2)


def run(data: str, modalities: str | None, preset: str, model_name: str, ablation: str, epochs: int | None,
        lr: float | None, batch_size: int | None, hidden: int | None, dropout: float | None,
        conv_kernel: int | None, patience: int | None,
        val_fraction: float | None, class_weighted: bool | None, causal: bool, seed: int, seeds: int, device: str,
        out_dir: str | None, resume: bool, quiet: bool, cdat: bool = False) -> dict:
    from .data import load_data
    from .registry import loss_config, model_config, model_names
    from .registry import preset as model_preset
    from .seeds import train_seeds
    from .train import train

    try:
        model_over, loss_over = get_ablation(ablation)
        if model_name not in model_names():
            raise ValueError(f"model: expected one of {model_names()}, got {model_name!r}")
        p = model_preset(model_name, preset)  # the model's own published recipe when it has one (SDT)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    t0 = time.perf_counter()
    fs = load_data(data)
    mods = parse_modalities(modalities, fs.modalities)
    fs = fs.select(mods)
    model_cfg = model_config(model_name, modalities=mods, feature_dims=fs.feature_dims, num_classes=len(fs.label_names),
                            num_speakers=fs.num_speakers, causal=causal,
                            **{**p.model, **model_over, **_given(d=hidden, dropout=dropout, conv_kernel=conv_kernel)})
    loss_cfg = loss_config(model_name, **{**p.loss, **loss_over, **_given(class_weighted=class_weighted, cdat=cdat or None)})
    train_cfg = TrainConfig(**{**p.train, **_given(epochs=epochs, lr=lr, batch_size=batch_size, patience=patience,
                                                    val_fraction=val_fraction), "seed": seed, "device": device})
    out = Path(out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    if not quiet:
        click.echo(f"cmath-train: {model_name}{' + confidence-KD' if cdat else ''} on {data} ({''.join(mods)}), preset {preset}, ablation {ablation}, "
                   f"{sum(len(v) for v in fs.splits.values())} conversations -> {out}")
    if seeds > 1:
        metrics = train_seeds(fs, model_cfg, loss_cfg, train_cfg, out, seeds, model_name, resume, not quiet)
    else:
        metrics = train(fs, model_cfg, loss_cfg, train_cfg, out, model_name, resume, not quiet)
    click.echo(summary_text(metrics, out, time.perf_counter() - t0))
    return metrics


def _given(**kw: object) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def summary_text(metrics: dict, out: Path, seconds: float) -> str:
    lines = [f"run: {out.resolve()}  ({seconds:.0f} s)"]
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            if isinstance(m["accuracy"], dict):
                lines.append(f"{split:10s} accuracy {100 * m['accuracy']['mean']:.2f} +- {100 * m['accuracy']['std']:.2f}  "
                             f"weighted-F1 {100 * m['weighted_f1']['mean']:.2f} +- {100 * m['weighted_f1']['std']:.2f}")
            else:
                lines.append(f"{split:10s} accuracy {100 * m['accuracy']:.2f}  weighted-F1 {100 * m['weighted_f1']:.2f}")
    for m, b in metrics.get("baseline_context_free", {}).items():
        if b.get("test_weighted_f1") is not None:
            lines.append(f"context-free logistic regression ({m}): test accuracy {100 * b['test_accuracy']:.2f}  "
                         f"weighted-F1 {100 * b['test_weighted_f1']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()


